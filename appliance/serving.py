"""The request path between HTTP and the engine: which weights serve a tenant, and the text.

`Catalog` answers "which model does this name mean for this tenant" — the only place that
decides it, so isolation is one function to read. `Generator` turns prompt ids into text chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .adapters.versions import VersionManager
from .engines.base import AdapterRef, Engine, GenerationRequest
from .tenancy.store import AdapterVersion, Store, Tenant
from .tokenization import StopMatcher, TextCodec


class ModelNotFound(LookupError):
    """The name means nothing this tenant may use. Same message whether or not it exists."""

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.")
        self.model = model


class ContextTooLong(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    model: str
    adapter: AdapterVersion | None  # None: the base model

    def engine_ref(self) -> AdapterRef | None:
        return AdapterRef(self.adapter.engine_name, self.adapter.path) if self.adapter else None


class Catalog:
    def __init__(self, store: Store, versions: VersionManager, base_model_name: str):
        self.store = store
        self.versions = versions
        self.base_model_name = base_model_name

    def resolve(self, tenant: Tenant, model: str, sticky: str | None = None) -> Target:
        """`<tenant>` (active version, or the canary for its share), `<tenant>@<version>`, or base."""
        if model == self.base_model_name and tenant.allow_base_model:
            return Target(model, None)
        name, _, version = model.partition("@")
        if name != tenant.name:
            raise ModelNotFound(model)
        adapter = self.store.get_adapter(name, version) if version else self.versions.choose(name, sticky)
        if adapter is None or adapter.state != "ready":
            raise ModelNotFound(model)
        return Target(model, adapter)

    def model_ids(self, tenant: Tenant) -> list[tuple[str, str]]:
        """(model id, owner) pairs this tenant may call."""
        ready = [a for a in self.store.adapters(tenant.name) if a.state == "ready"]
        ids = [(tenant.name, tenant.name)] if self.versions.active(tenant.name) else []
        ids += [(a.label, tenant.name) for a in ready]
        if tenant.allow_base_model:
            ids.append((self.base_model_name, "lorabox"))
        return ids


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
        """The max_tokens to run with; raises ContextTooLong when prompt + max_tokens won't fit."""
        room = self.max_model_len - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" + {max_tokens} completion tokens" if max_tokens is not None else ""
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens{asked}. Shorten the prompt or lower max_tokens."
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
    ) -> AsyncIterator[TextChunk]:
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
                result.completion_tokens += len(delta.token_ids)
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
