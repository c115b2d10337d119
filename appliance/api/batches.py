"""OpenAI's Batches API, per tenant: create, retrieve, list (paginated), cancel; and each line's
run through the request core that interactive requests go through (api/openai.py `running`).

A tenant sees only its own batches, and may batch only its own files: another tenant's id is the
404 of one that does not exist. A batch's lines run as requests of the key that made it, with the
tenant's adapter, caps, system prompt and guardrails; the interactive request-rate limit of that
key (`check_requests`) is not applied to them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..batch import jobs
from ..batch.files import FILE_ID
from ..batch.runner import BatchRunner, Outcome, RunLine
from .body import read_json
from .errors import APIError, bad_request, error_body
from .files import list_page, no_such_file
from .openai import (
    Caller,
    Trace,
    authenticate,
    chat_prompt,
    completion_prompt,
    ready_generator,
    recorded,
    running,
)
from .requests import parse_chat, parse_completion
from .services import SERVICES, Services

RUNNER = web.AppKey("batch_runner", BatchRunner)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_LIST_LIMIT = 100
CREATE_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata")
PROMPTS = {"chat": (parse_chat, chat_prompt), "completions": (parse_completion, completion_prompt)}


def no_such_batch(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")


def _metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > MAX_METADATA_PAIRS:
        raise bad_request(f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} pairs.", "metadata")
    for key, value in raw.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise bad_request(
                f"'metadata' keys are at most {MAX_METADATA_KEY} characters, values strings of at most "
                f"{MAX_METADATA_VALUE}.",
                "metadata",
            )
    return raw


async def create(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    caller = authenticate(request, services)
    tenant = caller.tenant.name
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    for name in body:
        if name not in CREATE_FIELDS:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    endpoint = body.get("endpoint")
    if endpoint not in jobs.ENDPOINTS:
        choices = ", ".join(jobs.ENDPOINTS)
        raise bad_request(f"'endpoint' must be one of {choices}.", "endpoint", "invalid_value")
    window = body.get("completion_window")
    if window not in jobs.COMPLETION_WINDOWS:
        raise bad_request("'completion_window' must be '24h'.", "completion_window", "invalid_value")
    metadata = _metadata(body.get("metadata"))
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise bad_request("'input_file_id' is required.", "input_file_id")
    stored = services.store.db.execute(
        "select purpose from files where id = ? and tenant = ?", [file_id, tenant]
    ).fetchone() if FILE_ID.fullmatch(file_id) else None  # fmt: skip
    if stored is None:
        raise no_such_file(file_id)
    if stored[0] != "batch":
        raise bad_request(f"The file {file_id} is not a batch input (purpose 'batch').", "input_file_id")
    created = jobs.now()
    batch = jobs.Batch(
        id=jobs.new_batch_id(),
        tenant=tenant,
        key_id=caller.key_id,
        key_kind=caller.key_kind,
        endpoint=endpoint,
        input_file_id=file_id,
        completion_window=window,
        metadata=json.dumps(metadata) if metadata is not None else None,
        status="validating",
        errors=None,
        output_file_id=None,
        error_file_id=None,
        total=0,
        completed=0,
        failed=0,
        created_at=created,
        in_progress_at=None,
        expires_at=created + jobs.COMPLETION_WINDOWS[window],
        finalizing_at=None,
        completed_at=None,
        failed_at=None,
        expired_at=None,
        cancelling_at=None,
        cancelled_at=None,
    )
    await services.writer.call(jobs.insert_batch, batch)
    request.app[RUNNER].wake()
    return web.json_response(batch.openai())


def _tenant_batch(request: web.Request) -> tuple[Services, str, jobs.Batch]:
    services = request.app[SERVICES]
    tenant = authenticate(request, services).tenant.name
    batch_id = request.match_info["batch_id"]
    batch = jobs.get_batch(services.store, batch_id, tenant)
    if batch is None:
        raise no_such_batch(batch_id)
    return services, tenant, batch


async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(_tenant_batch(request)[2].openai())


async def cancel(request: web.Request) -> web.Response:
    services, tenant, batch = _tenant_batch(request)
    cancelled = await services.writer.call(jobs.cancel, batch.id, tenant)
    if cancelled is None:
        raise no_such_batch(batch.id)
    request.app[RUNNER].wake()
    return web.json_response(cancelled.openai())


async def list_(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    tenant = authenticate(request, services).tenant.name
    try:
        limit = int(request.query.get("limit", 20))
    except ValueError:
        raise bad_request("'limit' must be a whole number.", "limit") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_request(f"'limit' must be between 1 and {MAX_LIST_LIMIT}.", "limit")
    page, more = jobs.list_batches(services.store, tenant, after=request.query.get("after"), limit=limit)
    return list_page([batch.openai() for batch in page], more)


def line_runner(services: Services) -> RunLine:
    """Runs one batch line as its request: through the request core, its result not streamed."""

    async def run_line(batch: jobs.Batch, body: str) -> Outcome:
        tenant = services.store.get_tenant(batch.tenant)
        if tenant is None or tenant.disabled:
            return Outcome(None, stop="The tenant was removed or disabled.")
        endpoint = jobs.ENDPOINTS[batch.endpoint]
        caller = Caller(tenant, batch.key_id, batch.key_kind)
        trace = Trace(caller, endpoint, services.engine_name, tier="batch", batch_id=batch.id)

        def book() -> None:  # a line without a result: through the ledger, as any request
            if not trace.published:
                trace.publish(services)

        parse, prompt = PROMPTS[endpoint]
        try:
            with recorded(trace, services, publish=False):
                generator = ready_generator(services)
                parsed = parse(json.loads(body))
                if parsed.stream:
                    raise bad_request("A batch's requests cannot stream.", "stream")
                trace.model = parsed.model
                target, prompt_ids = await prompt(services, generator, trace, parsed, parsed.user)
                async with running(services, generator, trace, target, parsed, prompt_ids) as run:
                    response = await run.collect()
        except APIError as exc:
            outcome = _refused(exc, book)
        except BaseException:
            book()
            raise
        else:
            outcome = Outcome({"status_code": 200, "request_id": response["id"], "body": response})
        if outcome.response is not None:  # its usage row is committed with it (batch/runner.py)
            trace.published = True
            record = trace.record()
            outcome.usage = services.ledger.row(record) if record.admitted else None
            outcome.count = lambda: services.count(record)
        return outcome

    return run_line


def _refused(exc: APIError, book: Any) -> Outcome:
    """A line the box would not run: an error line; or, when the refusal is for now (503, a
    rate limit, a full queue), no result (it runs again); when the quota ran out, the batch stops."""
    if exc.status == 503:
        return Outcome(None, retry_after_s=1.0, book=book)
    if exc.status == 429:
        if exc.code == "insufficient_quota":
            return Outcome(None, stop=exc.message, book=book)
        return Outcome(None, retry_after_s=float(exc.headers.get("Retry-After", 1)), book=book)
    body = error_body(exc.status, exc.message, exc.param, exc.code)
    return Outcome({"status_code": exc.status, "request_id": "", "body": body}, error=True, book=book)


def add_routes(app: web.Application, runner: BatchRunner) -> None:
    app[RUNNER] = runner
    app.cleanup_ctx.append(runner.running_ctx)
    for prefix in ("", "/t/{tenant}"):  # as the generation routes (api/openai.py)
        app.router.add_post(f"{prefix}/v1/batches", create)
        app.router.add_get(f"{prefix}/v1/batches", list_)
        app.router.add_get(f"{prefix}/v1/batches/{{batch_id}}", retrieve)
        app.router.add_post(f"{prefix}/v1/batches/{{batch_id}}/cancel", cancel)
