"""The generation stream: prompt ids in, text chunks out (detokenised, stop strings applied)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..engines.base import Engine, GenerationRequest
from .catalog import Target
from .tokenization import StopMatcher, TextCodec


class ContextTooLong(ValueError):
    pass


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class TextChunk:
    text: str
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """Filled in as the stream runs; complete once it has ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    """time.perf_counter() when the engine produced the first token."""

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

    async def stream(
        self,
        *,
        request_id: str,
        target: Target,
        cache_salt: str,
        prompt_ids: list[int],
        options: SamplingOptions,
        result: GenerationResult,
        on_tokens: Callable[[int], None] | None = None,
    ) -> AsyncIterator[TextChunk]:
        """`on_tokens` learns of every completion token as the engine produces it (the fair
        scheduler charges them as they come)."""
        request = GenerationRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            max_tokens=self.budget(prompt_ids, options.max_tokens),
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop_token_ids=self.codec.eos_token_ids,
            adapter=target.engine_ref(),
            cache_salt=cache_salt,
        )
        detok = self.codec.detokenizer()
        stops = StopMatcher(options.stop)
        async with contextlib.aclosing(self.engine.generate(request)) as deltas:
            async for delta in deltas:
                if result.first_token_at is None and delta.token_ids:
                    result.first_token_at = time.perf_counter()
                result.completion_tokens += len(delta.token_ids)
                if on_tokens is not None and delta.token_ids:
                    on_tokens(len(delta.token_ids))
                text, stopped = stops.push(detok.feed(delta.token_ids))
                if stopped:
                    # Leaving the loop closes the engine stream, which aborts the request.
                    result.finish_reason = "stop"
                    yield TextChunk(text, "stop")
                    return
                if delta.finish_reason:
                    tail, stopped = stops.push(detok.finish())
                    text += tail if stopped else tail + stops.flush()
                    result.finish_reason = "stop" if stopped else delta.finish_reason
                    yield TextChunk(text, result.finish_reason)
                    return
                if text:
                    yield TextChunk(text)
