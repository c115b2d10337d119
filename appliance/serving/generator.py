"""The generation stream: prompt ids in; per choice, text, logprobs and tool calls out.

Each of a request's `n` choices is its own engine request (seed + i when a seed is given, as vLLM's
parallel sampling does), and its own output path, in this order: the detokenizer, the stop strings
(text that could begin one is held back), the tenant's guardrails (text that could begin a denied
match is held back, detected e-mails, phones and cards replaced), then the tool-call reader (text
that could begin a call is held back). Whatever else must see a choice's text before the client
does belongs in that chain, in `_Choice.released`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..engines.base import Engine, GenerationRequest, Grammar, TokenDelta, TokenLogprob
from .catalog import Target
from .guardrails import OutputGuard, OutputRules
from .tokenization import StopMatcher, TextCodec
from .tools import CallOut, Format, ToolCallReader


class ContextTooLong(ValueError):
    pass


@dataclass(frozen=True)
class SamplingOptions:
    """What the request asks of the generation; the engine enforces all but `stop` and `n`."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    """Alternatives per token (0: the chosen token only); None: no logprobs."""
    grammar: Grammar | None = None


@dataclass(frozen=True)
class ToolReading:
    """How a chat request's choices are read for tool calls: the family's format, the functions
    offered, and the special tokens the detokenizer keeps (the format's markers)."""

    format: Format
    names: frozenset[str]
    keep: frozenset[int] = frozenset()


@dataclass
class TextChunk:
    text: str
    finish_reason: str | None = None
    index: int = 0
    """Which choice it belongs to."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """The entries of the tokens produced since the choice's previous chunk."""
    calls: list[CallOut] = field(default_factory=list)


@dataclass
class GenerationResult:
    """Filled in as the stream runs; complete once it has ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    """Of every choice."""
    finish_reasons: dict[int, str] = field(default_factory=dict)
    first_token_at: float | None = None
    """time.perf_counter() when the engine produced the first token."""
    guardrails: set[str] = field(default_factory=set)
    """Which of the tenant's output guardrails acted, in any choice (deny_output, redact_output)."""

    @property
    def finish_reason(self) -> str | None:
        """The first choice's (the usage ledger's)."""
        return self.finish_reasons.get(0)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Generator:
    def __init__(self, engine: Engine, codec: TextCodec, max_model_len: int):
        self.engine = engine
        self.codec = codec
        self.max_model_len = max_model_len

    def budget(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The max_tokens to run with; raises ContextTooLong when prompt + max_tokens won't fit.

        A prompt encoded up to `max_model_len` ids only (see PromptEncoder) may be longer still."""
        room = self.max_model_len - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" + {max_tokens} completion tokens" if max_tokens is not None else ""
            count = f"at least {self.max_model_len}" if room < 1 else str(len(prompt_ids))
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{count} prompt tokens{asked}. Shorten the prompt or lower max_tokens."
            )
        return max_tokens if max_tokens is not None else room

    def stream(
        self,
        *,
        request_id: str,
        target: Target,
        cache_salt: str,
        prompt_ids: list[int],
        options: SamplingOptions,
        result: GenerationResult,
        on_tokens: Callable[[int], None] | None = None,
        tools: ToolReading | None = None,
        guard: OutputRules | None = None,
    ) -> AsyncIterator[TextChunk]:
        """The chunks of every choice, as they come. `on_tokens` learns of every completion token
        as the engine produces it (the fair scheduler charges them as they come). `guard`: the
        tenant's output guardrails."""
        base = GenerationRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            max_tokens=self.budget(prompt_ids, options.max_tokens),
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            # The model's end of sequence still ends a choice under ignore_eos on every engine
            # only if it is a stop token: it is left out.
            stop_token_ids=() if options.ignore_eos else self.codec.eos_token_ids,
            adapter=target.engine_ref(),
            cache_salt=cache_salt,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            repetition_penalty=options.repetition_penalty,
            logit_bias=options.logit_bias,
            min_tokens=options.min_tokens,
            ignore_eos=options.ignore_eos,
            logprobs=options.logprobs,
            grammar=options.grammar,
        )
        choices = [
            _Choice(self, i, options, result, on_tokens, tools, guard).run(_nth(base, i, options.n))
            for i in range(options.n)
        ]
        return choices[0] if len(choices) == 1 else _merged(choices)


def _nth(request: GenerationRequest, index: int, n: int) -> GenerationRequest:
    if n == 1:
        return request
    seed = request.seed + index if request.seed is not None else None
    return dataclasses.replace(request, request_id=f"{request.request_id}-{index}", seed=seed)


class _Choice:
    """One choice's way from token ids to what the client sees."""

    def __init__(
        self,
        generator: Generator,
        index: int,
        options: SamplingOptions,
        result: GenerationResult,
        on_tokens: Callable[[int], None] | None,
        tools: ToolReading | None,
        guard: OutputRules | None,
    ):
        self.engine, self.index, self.result, self.on_tokens = generator.engine, index, result, on_tokens
        self.detok = generator.codec.detokenizer(tools.keep if tools else frozenset())
        self.stop_strings, self.min_tokens = options.stop, options.min_tokens
        # vLLM looks for stop strings only once min_tokens are out; so does lorabox.
        self.stops = StopMatcher(options.stop if not options.min_tokens else ())
        self.reader = ToolCallReader(tools.format, set(tools.names)) if tools else None
        self.guard = OutputGuard(guard) if guard else None
        self.generated = 0
        self.stop_token_ids: tuple[int, ...] = ()
        self.logprobs: list[TokenLogprob] = []

    async def run(self, request: GenerationRequest) -> AsyncIterator[TextChunk]:
        result = self.result
        self.stop_token_ids = request.stop_token_ids
        async with contextlib.aclosing(self.engine.generate(request)) as deltas:
            async for delta in deltas:
                self._count(delta)
                text, stopped = self.stops.push(self.detok.feed(delta.token_ids))
                if self.min_tokens and self.generated >= self.min_tokens and self.stop_strings:
                    self.stops, self.min_tokens = StopMatcher(self.stop_strings), 0
                finish = "stop" if stopped else delta.finish_reason
                if finish is not None and not stopped:
                    tail, stopped = self.stops.push(self.detok.finish())
                    text += tail if stopped else tail + self.stops.flush()
                    finish = "stop" if stopped else finish
                chunk = self.released(text, finish)
                if chunk.finish_reason is not None:  # also a cut by the guardrails
                    # Leaving the loop closes the engine stream, which aborts a request cut by a stop.
                    result.finish_reasons[self.index] = chunk.finish_reason
                    yield chunk
                    return
                if chunk.text or chunk.calls or chunk.logprobs:
                    yield chunk

    def _count(self, delta: TokenDelta) -> None:
        result = self.result
        if result.first_token_at is None and delta.token_ids:
            result.first_token_at = time.perf_counter()
        result.completion_tokens += len(delta.token_ids)
        self.generated += len(delta.token_ids)
        if self.on_tokens is not None and delta.token_ids:
            self.on_tokens(len(delta.token_ids))
        if delta.logprobs:
            # The stop token ends the choice but is no part of its text: nor of its logprobs.
            last = delta.token_ids[-1] if delta.token_ids else None
            stopped = delta.finish_reason == "stop" and last in self.stop_token_ids
            self.logprobs.extend(delta.logprobs[:-1] if stopped else delta.logprobs)

    def released(self, text: str, finish: str | None) -> TextChunk:
        """The chunk the client gets for `text` that passed the stop strings."""
        if self.guard is not None:
            text, cut = self.guard.push(text, final=finish is not None)
            self.result.guardrails |= self.guard.actions
            finish = "content_filter" if cut else finish
        calls: list[CallOut] = []
        if self.reader is not None:
            released = self.reader.push(text, final=finish is not None)
            text, calls = released.text, released.calls
            if finish == "stop" and self.reader.calls:
                finish = "tool_calls"
        logprobs, self.logprobs = self.logprobs, []
        return TextChunk(text, finish, self.index, logprobs, calls)


_DONE = object()


async def _merged(streams: list[AsyncIterator[TextChunk]]) -> AsyncIterator[TextChunk]:
    """The chunks of several streams as they come; closing it (or an error in one) ends them all."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[TextChunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait(chunk)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
