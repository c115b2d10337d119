"""The OpenAI-compatible routes. The API key decides the tenant; `model` picks its weights.

Every route is served twice: at `/v1/...` and at `/t/<tenant>/v1/...`. A service key (no tenant's
own) names the tenant it acts for by that prefix or by the `X-Lorabox-Tenant` header; a tenant's
own key may name only itself. A tenant the key may not act for, or that does not exist, is the
404 of a model that does not exist (`model_not_found`, naming the tenant as the model): no caller
learns which tenants exist."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..engines.base import Grammar
from ..errors import EngineDead, PolicyError
from ..serving.catalog import ModelNotFound, Target
from ..serving.generator import ContextTooLong, GenerationResult, Generator, SamplingOptions, ToolReading
from ..serving.guardrails import OutputRules, input_denied, output_rules
from ..serving.lifecycle import InFlight, Interrupted
from ..serving.structured import GrammarRefused, json_schema_grammar
from ..serving.tokenization import PromptError
from ..serving.tools import kept_tokens, literal_for
from ..tenancy.admission import BATCH, KeyLimits, Refusal, Ticket
from ..tenancy.ledger import LedgerUnavailable, RequestRecord
from ..tenancy.policy import Policy
from ..tenancy.store import Tenant
from .body import read_request
from .errors import APIError, bad_request, error_body
from .requests import (
    ParsedRequest,
    check_against_model,
    check_token_ids,
    grammar_refused,
    parse_chat,
    parse_completion,
)
from .services import SERVICES, Services
from .shapes import Collected, Shape, sse

log = logging.getLogger(__name__)


CLIENT_CLOSED = 499  # nginx's code for "client closed the request", kept in the usage ledger
# The server could not finish the request (the engine failed, or the drain deadline passed): the
# status a non-streamed reply gets, and the one booked for a stream cut by an in-band error event.
UNAVAILABLE = 503
FINAL_WRITE_S = 1.0  # how long a cut stream may take to send its error event (the client may be stuck)


TENANT_HEADER = "X-Lorabox-Tenant"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant it acts for, and which key (of which kind) sent it."""

    tenant: Tenant
    key_id: str
    key_kind: str = "tenant"
    key_limits: KeyLimits | None = None
    """A service key's own limits (tenant keys have none)."""


def model_not_found(model: str) -> APIError:
    return APIError(404, str(ModelNotFound(model)), param="model", code="model_not_found")


def named_tenant(request: web.Request) -> str | None:
    """The tenant the request names, by URL prefix or header; None when it names none."""
    path = request.match_info.get("tenant")
    header = request.headers.get(TENANT_HEADER) or None  # an empty header names nobody
    if path is not None and header is not None and header != path:
        raise bad_request(f"The {TENANT_HEADER} header and the URL name different tenants.", TENANT_HEADER)
    return path if path is not None else header


def authenticate(request: web.Request, services: Services) -> Caller:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401, "Missing API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    holder = services.store.key_holder(key.strip())
    if holder is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    name = named_tenant(request)
    if name is None:
        if holder.kind == "service":
            raise bad_request(
                f"A service key acts for a tenant it names: send the {TENANT_HEADER} header, or call "
                "/t/<tenant>/v1/... .",
                TENANT_HEADER,
                "tenant_required",
            )
        name = holder.tenant
    tenant = services.store.get_tenant(name) if holder.may_act_for(name) else None
    if tenant is None or tenant.disabled:
        raise model_not_found(name)
    if holder.kind == "tenant":
        return Caller(tenant, holder.key_id)
    limits = KeyLimits(holder.key_id, holder.rpm, holder.tpm) if holder.rpm or holder.tpm else None
    return Caller(tenant, holder.key_id, "service", limits)


@dataclass
class Trace:
    """What a request's `RequestRecord` will say, filled in as the request goes."""

    caller: Caller
    endpoint: str
    engine: str
    started: float = field(default_factory=time.perf_counter)
    model: str = ""
    adapter_version: str = ""
    status: int = 500  # until something better is known
    admitted: bool = False  # set once the request passed admission; it then owns `status`
    ticket: Ticket | None = None
    result: GenerationResult | None = None  # once the request has started in the engine
    published: bool = False
    guardrails: set[str] = field(default_factory=set)
    """Which of the tenant's guardrails acted on the request before it ran (deny_input)."""
    tier: str = "default"
    """`batch` for a batch job's line, `flex` for a request that asked for `service_tier: "flex"`:
    both run in the scheduler's background band, at the batch prices (admission.BACKGROUND)."""
    batch_id: str | None = None

    def settle(self) -> None:
        """Give back what the request reserved and did not use (idempotent)."""
        if self.ticket is not None:
            result = self.result
            self.ticket.finish(
                result.prompt_tokens if result else 0, result.completion_tokens if result else 0
            )

    def publish(self, services: Services) -> asyncio.Future[None]:
        self.published = True
        return services.publish(self.record())

    async def book(self, services: Services, status: int) -> None:
        """Settle and book the request as `status`, and wait until its row is durable: called
        before the last byte of the response goes out. APIError 503 if it cannot be (the response
        must then end with that error, not its last bytes: the ledger books it as 503)."""
        self.settle()
        self.status = status
        try:
            await asyncio.shield(self.publish(services))
        except LedgerUnavailable as exc:
            self.status = UNAVAILABLE
            raise ledger_unavailable(str(exc)) from exc

    def record(self) -> RequestRecord:
        result = self.result
        first = result.first_token_at if result else None
        policy = self.ticket.policy if self.ticket else None
        price_in, price_out = policy.prices(self.tier) if policy else (0.0, 0.0)
        return RequestRecord(
            tenant=self.caller.tenant.name,
            key_id=self.caller.key_id,
            key_kind=self.caller.key_kind,
            model=self.model,
            adapter_version=self.adapter_version,
            endpoint=self.endpoint,
            engine=self.engine,
            status=self.status,
            finish_reason=(result.finish_reason or "") if result else "",
            prompt_tokens=result.prompt_tokens if result else 0,
            completion_tokens=result.completion_tokens if result else 0,
            ttft_ms=round((first - self.started) * 1000, 2) if first is not None else None,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 2),
            price_in=price_in,
            price_out=price_out,
            tier=self.tier,
            batch_id=self.batch_id,
            admitted=self.admitted,
            guardrails=tuple(sorted(self.guardrails | (result.guardrails if result else set()))),
        )


Handler = Callable[[web.Request, "Services", Trace], Awaitable[web.StreamResponse]]


async def traced(request: web.Request, endpoint: str, handle: Handler) -> web.StreamResponse:
    """Run a generation endpoint for an authenticated caller; publish its record however it ends
    (an admitted request that ran books itself before its last byte; see `Trace.book`).

    No await separates the end of `handle` from the publishing: a shutdown that waits for the
    requests in flight to end finds every one of them booked. Every response that is not already
    on its way carries the tenant's rate-limit headers."""
    services = request.app[SERVICES]
    trace = Trace(authenticate(request, services), endpoint, services.engine_name)
    tenant = trace.caller.tenant.name
    with recorded(trace, services):
        try:
            response = await handle(request, services, trace)
        except APIError as exc:
            exc.headers = services.admission.headers(tenant) | exc.headers
            raise
        if not trace.admitted:
            trace.status = response.status
        if not response.prepared:
            for name, value in services.admission.headers(tenant).items():
                response.headers.setdefault(name, value)
        return response


@contextlib.contextmanager
def recorded(trace: Trace, services: Services, publish: bool = True) -> Iterator[None]:
    """The status of a request that ends before admission (admitted, it owns its status), and
    its record settled and published however it ends (`publish` False: the caller publishes)."""
    try:
        yield
    except (APIError, web.HTTPException) as exc:
        if not trace.admitted:
            trace.status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        if not trace.admitted:
            trace.status = CLIENT_CLOSED
        raise
    finally:
        trace.settle()
        if publish and not trace.published:
            trace.publish(services)


def refused(refusal: Refusal) -> APIError:
    """An admission refusal as the client sees it: 429 or 503, when to retry, whether at all."""
    headers = dict(refusal.headers)
    if refusal.retry_after_s is not None:
        headers["Retry-After"] = str(math.ceil(refusal.retry_after_s))
        headers["retry-after-ms"] = str(math.ceil(refusal.retry_after_s * 1000))
    if not refusal.should_retry:
        headers["x-should-retry"] = "false"
    return APIError(refusal.status, refusal.message, code=refusal.code, headers=headers)


def check_requests(services: Services, caller: Caller) -> None:
    """A tenant (or service key) out of requests for now is refused before its body is read."""
    try:
        services.admission.check_requests(caller.tenant.name, caller.key_limits)
    except Refusal as refusal:
        raise refused(refusal) from None


def ledger_unavailable(reason: str) -> APIError:
    return APIError(
        UNAVAILABLE,
        f"lorabox cannot record usage now, so it serves no requests: {reason}",
        code="usage_ledger_unavailable",
    )


def ready_generator(services: Services) -> Generator:
    """The generator, if the box may serve now: the engine is ready, and the usage ledger can
    book what it serves (a request it could not bill is refused, not served)."""
    if services.generator is None:
        raise APIError(503, "The model is still loading; retry shortly.", code="engine_not_ready")
    if services.ledger.unavailable is not None:
        raise ledger_unavailable(services.ledger.unavailable)
    return services.generator


def sticky_id(request: web.Request, parsed: ParsedRequest) -> str | None:
    """What keeps a canary split sticky: the end user, or the client's request id, if named."""
    request_id = request.headers.get("X-Request-ID")
    if request_id is not None and not request_id.isascii():
        try:
            request_id.encode()
        except UnicodeEncodeError:  # aiohttp keeps undecodable header bytes as surrogates
            raise bad_request("The X-Request-ID header is not valid UTF-8.") from None
    return parsed.user or request_id


def resolve(services: Services, tenant: Tenant, parsed: ParsedRequest, sticky: str | None) -> Target:
    try:
        return services.catalog.resolve(tenant, parsed.model, sticky)
    except ModelNotFound as exc:
        raise model_not_found(exc.model) from exc


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await traced(request, "chat", _chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await traced(request, "completions", _completion)


async def _chat(request: web.Request, services: Services, trace: Trace) -> web.StreamResponse:
    return await _respond(request, services, trace, parse_chat, chat_prompt)


async def _completion(request: web.Request, services: Services, trace: Trace) -> web.StreamResponse:
    return await _respond(request, services, trace, parse_completion, completion_prompt)


Prompt = Callable[
    [Services, Generator, Trace, ParsedRequest, "str | None"], Awaitable[tuple[Target, list[int]]]
]
"""What an endpoint makes of a parsed request: its weights and its prompt's token ids."""


async def _respond(
    request: web.Request,
    services: Services,
    trace: Trace,
    parse: Callable[[Any], ParsedRequest],
    prompt: Prompt,
) -> web.StreamResponse:
    generator = ready_generator(services)
    check_requests(services, trace.caller)
    parsed = await read_request(request, parse)
    trace.model = parsed.model
    trace.tier = parsed.service_tier or trace.tier
    target, prompt_ids = await prompt(services, generator, trace, parsed, sticky_id(request, parsed))
    async with running(services, generator, trace, target, parsed, prompt_ids) as run:
        if not parsed.stream:
            body = await run.collect()
            await trace.book(services, 200)
            return web.json_response(body, headers=run.ticket.headers)
        response, trace.status = await _stream(
            request,
            run.shape,
            run.options.n,
            run.chunks,
            run.result,
            parsed.include_usage,
            run.in_flight,
            run.ticket.headers,
            lambda status: trace.book(services, status),
        )
        return response


async def chat_prompt(
    services: Services, generator: Generator, trace: Trace, parsed: ParsedRequest, sticky: str | None
) -> tuple[Target, list[int]]:
    tenant = trace.caller.tenant
    target = resolve(services, tenant, parsed, sticky)
    system_prompt = services.admission.policy_for(tenant.name).system_prompt
    tools = None
    if parsed.tools is not None:
        if services.tool_format is None:
            reason = services.tool_format_reason
            raise bad_request(f"'tools' cannot be used with this model: {reason}.", "tools")
        tools = [tool.sent for tool in parsed.tools.tools]
    texts = [m["content"] for m in parsed.messages or [] if isinstance(m.get("content"), str)]
    check_input(services, trace, texts, "messages")
    try:
        prompt_ids = await services.encoder.chat(
            parsed.messages or [], generator.max_model_len, system_prompt, tools, parsed.prompt_chars
        )
    except PromptError as exc:
        raise bad_request(str(exc), "messages") from exc
    return target, prompt_ids


async def completion_prompt(
    services: Services, generator: Generator, trace: Trace, parsed: ParsedRequest, sticky: str | None
) -> tuple[Target, list[int]]:
    target = resolve(services, trace.caller.tenant, parsed, sticky)
    if isinstance(parsed.prompt, list):
        prompt_ids = parsed.prompt[: generator.max_model_len]  # as for text: past it, too long anyway
        check_token_ids(prompt_ids, len(services.codec.tokenizer))
    else:
        prompt_ids = await services.encoder.prompt(parsed.prompt or "", generator.max_model_len)
    # Token ids are checked as the text they stand for: a pattern is not dodged by sending ids.
    text = parsed.prompt if isinstance(parsed.prompt, str) else services.codec.decode(prompt_ids)
    check_input(services, trace, [text], "prompt")
    return target, prompt_ids


def guardrail_invalid(exc: PolicyError) -> APIError:
    """A tenant's guardrails that cannot be applied (the database was edited past the caps): its
    requests are refused, since a filter that does not run must not look like one."""
    log.error("guardrails cannot be applied: %s; fix with lorabox tenant set", exc)
    return APIError(500, f"This tenant's guardrails cannot be applied: {exc}", code="guardrail_invalid")


def check_input(services: Services, trace: Trace, texts: list[str], param: str) -> None:
    """The tenant's deny_input patterns against what the client sent. The refusal names no
    pattern: it would teach how to word around it."""
    patterns = services.admission.policy_for(trace.caller.tenant.name).deny_input
    try:
        denied = input_denied(patterns, texts)
    except PolicyError as exc:
        raise guardrail_invalid(exc) from exc
    if denied:
        trace.guardrails.add("deny_input")
        raise APIError(
            400,
            "The request was refused by this deployment's content policy.",
            param=param,
            code="content_policy_violation",
        )


def _output_rules(policy: Policy, options: SamplingOptions) -> OutputRules | None:
    """The tenant's output guardrails (None: none)."""
    try:
        rules = output_rules(policy.deny_output, policy.redact_output)
    except PolicyError as exc:
        raise guardrail_invalid(exc) from exc
    if rules is not None and options.logprobs is not None:
        # Each token's text would show what the filter holds back, cuts or redacts.
        raise bad_request("logprobs are not available: this model's output is filtered.", "logprobs")
    return rules


def _max_tokens(generator: Generator, prompt_ids: list[int], asked: int | None, cap: int | None) -> int:
    """The completion tokens to run with: what the request asked for, refused past the tenant's
    cap; when it asked for none, the cap (or the room left in the context)."""
    if asked is not None and cap is not None and asked > cap:
        raise bad_request(
            f"max_tokens is too large: {asked}. This key may ask for at most {cap} completion tokens "
            "per request.",
            "max_tokens",
            "invalid_value",
        )
    try:
        room = generator.budget(prompt_ids, asked)
    except ContextTooLong as exc:
        raise bad_request(str(exc), "max_tokens", "context_length_exceeded") from exc
    return room if asked is not None or cap is None else min(room, cap)


@dataclass
class Run:
    """A request admitted and started in the engine (see `running`)."""

    shape: Shape
    options: SamplingOptions
    ticket: Ticket
    in_flight: InFlight
    result: GenerationResult
    chunks: Any
    """The engine's chunks (async iterator), each with its choice's index."""

    async def collect(self) -> dict[str, Any]:
        """The whole response body, as a request that does not stream gets it."""
        choices = {i: Collected() for i in range(self.options.n)}
        with self.in_flight.interruptible():
            async for chunk in self.chunks:
                choices[chunk.index].add(chunk)
        return self.shape.body(choices, self.result)


@contextlib.asynccontextmanager
async def running(
    services: Services,
    generator: Generator,
    trace: Trace,
    target: Target,
    parsed: ParsedRequest,
    prompt_ids: list[int],
) -> AsyncIterator[Run]:
    """The request core, shared by every request and every batch line: the tenant's caps, its
    output rules and grammar, admission (quota, limits: the ticket), the fair queue, then the
    engine's chunks. The body of the `async with` turns them into a response and books it; an
    engine failure or a shutdown that ends it is booked as 503 and raised as that APIError."""
    chat = trace.endpoint == "chat"
    if not prompt_ids:
        raise bad_request("The prompt is empty.", "messages" if chat else "prompt")
    tenant = trace.caller.tenant.name
    policy = services.admission.policy_for(tenant)
    max_tokens = _max_tokens(generator, prompt_ids, parsed.options.max_tokens, policy.max_tokens)
    options = parsed.options
    check_against_model(options, len(services.codec.tokenizer), policy.max_n, max_tokens)
    guard = _output_rules(policy, options)
    grammar = await _grammar(services, parsed, tenant)
    options = dataclasses.replace(options, max_tokens=max_tokens, grammar=grammar)
    try:
        # Every choice may run to max_tokens: the reservation covers them all. With shared
        # counters (Redis) the take is awaited.
        admission, reserve = services.admission, max_tokens * options.n
        adapter = parsed.model if target.adapter else ""  # as requests name it: the picker's key
        # Rate limits are interactive traffic's: a batch line meets neither the tenant's nor its key's.
        key, tier = (trace.caller.key_limits if trace.tier != BATCH else None), trace.tier
        ticket = trace.ticket = (
            admission.admit(tenant, len(prompt_ids), reserve, adapter, key, tier)
            if admission.shared is None
            else await admission.admit_shared(tenant, len(prompt_ids), reserve, adapter, key, tier)
        )
    except Refusal as refusal:
        raise refused(refusal) from None
    trace.admitted, trace.status = True, 200
    trace.adapter_version = target.adapter.version if target.adapter else ""
    said = trace.tier if parsed.service_tier and trace.tier != BATCH else None  # the tier that served it
    shape = Shape(chat, parsed.model, services.codec, options.logprobs is not None, said)
    reading = None
    if parsed.tools is not None and parsed.tools.reads_calls and services.tool_format is not None:
        keep = kept_tokens(services.tool_format, services.codec.tokenizer)
        reading = ToolReading(services.tool_format, frozenset(parsed.tools.names), keep)
    try:
        # Entering the lease is synchronous: a version retired from now on waits for this request.
        with services.lifecycle.request() as in_flight, services.catalog.versions.lease(target.adapter):
            with in_flight.interruptible():
                await ticket.wait()  # the fair queue
            result = trace.result = GenerationResult(prompt_tokens=len(prompt_ids))
            chunks = generator.stream(
                request_id=shape.id,
                target=target,
                cache_salt=f"tenant:{tenant}",
                prompt_ids=prompt_ids,
                options=options,
                result=result,
                on_tokens=ticket.served,
                tools=reading,
                guard=guard,
            )
            yield Run(shape, options, ticket, in_flight, result, chunks)
    except (Interrupted, EngineDead) as exc:
        error = _unavailable(exc)
        error.headers = ticket.headers
        await trace.book(services, UNAVAILABLE)
        raise error from exc
    except (asyncio.CancelledError, ConnectionResetError):
        trace.status = CLIENT_CLOSED
        raise
    except Exception:
        trace.status = 500
        raise


async def _grammar(services: Services, parsed: ParsedRequest, tenant: str) -> Grammar | None:
    """What the output must match (tool calls, the content's JSON schema), checked by the grammar
    compiler (serving/structured.py): a grammar it refuses is a 400 naming its parameter."""
    grammar = None
    if parsed.tools is not None and services.tool_format is not None:
        literal = literal_for(services.codec.tokenizer)
        grammar = parsed.tools.grammar(services.tool_format, literal, parsed.content_schema)
    if grammar is None and parsed.content_schema is not None:
        grammar = json_schema_grammar(parsed.content_schema)
    if grammar is not None:
        try:
            await services.grammars.check(grammar, tenant)
        except GrammarRefused as exc:
            raise grammar_refused(exc, parsed) from exc
    return grammar


def _unavailable(exc: Interrupted | EngineDead) -> APIError:
    interruption = exc if isinstance(exc, Interrupted) else Interrupted.engine_failed(str(exc))
    return APIError(UNAVAILABLE, interruption.message, code=interruption.code)


async def _stream(
    request: web.Request,
    shape: Shape,
    n: int,
    chunks: Any,
    result: GenerationResult,
    include_usage: bool,
    in_flight: InFlight,
    headers: dict[str, str],
    book: Callable[[int], Awaitable[None]],
) -> tuple[web.StreamResponse, int]:
    """Stream the chunks as SSE; returns the response and the status booked for it (`book` is
    called before the last event: the usage chunk, if asked for, or [DONE])."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        | headers
    )
    await response.prepare(request)
    usage_field = {"usage": None} if include_usage else {}

    async def send(payload: dict[str, Any] | str) -> None:
        await response.write(sse(payload))

    # The status line is gone already: an error is told in-band, as OpenAI does, then [DONE].
    error: APIError | None = None
    try:
        with in_flight.interruptible():
            if shape.chat:
                for index in range(n):
                    await send(shape.first(index) | usage_field)
            async for chunk in chunks:
                if (event := shape.text_event(chunk, usage_field)) is not None:
                    await response.write(event)
                    continue
                for payload in shape.chunks(chunk):
                    await send(payload | usage_field)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except (Interrupted, EngineDead) as exc:
        error = _unavailable(exc)
        log.warning("stream %s cut after %d tokens: %s", shape.id, result.completion_tokens, error.message)
    except Exception:
        log.exception("stream %s failed", shape.id)
        error = APIError(
            500, "Internal server error while streaming; see the lorabox log.", code="internal_error"
        )

    async def finish() -> None:
        if error is not None:
            await send(error_body(error.status, error.message, error.param, error.code))
        elif include_usage:
            await send(shape.usage_chunk(result))
        await send("[DONE]")
        await response.write_eof()

    if error is None:
        try:
            await book(200)
        except APIError as unbooked:  # no durable row: the stream ends with the error, not [DONE]
            error = unbooked
        else:
            await finish()
            return response, 200
    # The request is booked as the server's failure whether or not a stuck or vanished client
    # takes these last lines.
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        async with asyncio.timeout(FINAL_WRITE_S):
            if error.code != "usage_ledger_unavailable":
                with contextlib.suppress(APIError):  # the row could not be made durable: 503 all the same
                    await book(error.status)
            await finish()
    return response, error.status


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    tenant = authenticate(request, services).tenant
    created = int(services.started_at)
    data = [
        {"id": model_id, "object": "model", "created": created, "owned_by": owner}
        for model_id, owner in services.catalog.model_ids(tenant)
    ]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    engine = {
        "engine": services.engine_name,
        "engine_reason": services.engine_reason,
        "engine_fallback": services.engine_fallback or None,
    }
    # The engine's own word first: it knows of its death before the health watch has polled.
    failure = services.lifecycle.failure or services.engine.failure()
    if failure is not None:
        return web.json_response({"status": "failed", "reason": failure} | engine, status=503)
    if services.lifecycle.phase == "stopping":
        return web.json_response(
            {"status": "stopping", "reason": "lorabox is shutting down"} | engine, status=503
        )
    if services.generator is None:
        return web.json_response({"status": "starting"} | engine, status=503)
    if services.ledger.unavailable is not None:
        reason = f"usage ledger unavailable: {services.ledger.unavailable}"
        return web.json_response({"status": "refusing", "reason": reason} | engine, status=503)
    if (limits := services.admission.limits_problem()) is not None:
        reason, refusing = limits
        if refusing:
            return web.json_response({"status": "refusing", "reason": reason} | engine, status=503)
        return web.json_response({"status": "ready", "degraded": reason} | engine)
    return web.json_response({"status": "ready"} | engine)


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/t/{tenant}"):  # the tenant by key (or header), or by URL
        app.router.add_post(f"{prefix}/v1/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/v1/completions", completions)
        app.router.add_get(f"{prefix}/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
