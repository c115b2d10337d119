"""The engine contract. Engines see token ids and opaque adapter names: no tenants, no HTTP."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version as the engine sees it. `name` is unique per version and content."""

    name: str
    path: str


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    adapter: AdapterRef | None = None
    cache_salt: str = ""
    """Prefix-cache namespace, set by the server (never by a client): one per tenant."""


@dataclass(frozen=True)
class TokenDelta:
    """Tokens produced since the previous delta; the last one carries `finish_reason`."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass(frozen=True)
class EngineMemory:
    """What the engine holds, in bytes of the memory it runs on (VRAM on a GPU, else host memory),
    as far as the engine knows it; None where it does not."""

    weights: int | None = None
    kv_cache: int | None = None
    adapter_slots: int | None = None


@dataclass
class EngineStats:
    engine: str
    device: str
    loaded_adapters: list[str] = field(default_factory=list)
    running_requests: int = 0
    """Requests the engine is generating for now."""
    waiting_requests: int = 0
    """Requests handed to the engine that wait there: for a batch place, or for an adapter slot."""
    kv_cache_usage: float | None = None
    """Fraction of the KV cache in use (0-1), or None where the engine does not say."""
    gpu_slots: int | None = None
    """Adapters one batch may use at once (vLLM's `max_loras`); None where there is no such limit."""
    kv_cache_blocks: tuple[int, int] | None = None
    """(tokens per block, blocks) of the KV cache, once known: vLLM's paged cache as it allocated it;
    llama.cpp's cells counted in blocks of 16 tokens (it has none of its own)."""
    pinned: list[str] = field(default_factory=list)
    """Adapters held in fast memory for good (engine names)."""
    memory: EngineMemory = field(default_factory=EngineMemory)
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    name: str

    @property
    def max_batch(self) -> int:
        """How many requests it runs at once once started; more wait inside it, first come first
        served (lorabox's fair queue keeps them out until there is room)."""
        ...

    async def start(self) -> None:
        """Load the base model; return when requests can be served."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream tokens. Closing the iterator early aborts the request inside the engine."""
        ...

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Make an adapter ready (warm) so that its first request pays no load."""

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        """Drop an adapter from the engine's caches (and its pin, if it had one)."""

    async def pin_adapter(self, adapter: AdapterRef) -> None:
        """Keep a loaded adapter in fast memory (a GPU slot) until unpinned or unloaded.

        May wait until a slot is free of other work; raises AdapterError when it cannot be done."""

    async def unpin_adapter(self, adapter: AdapterRef) -> None:
        """Make a pinned adapter an ordinary cache entry again; it stays loaded."""

    def failure(self) -> str | None:
        """Why this engine can no longer serve (e.g. its core process died), or None while it can.

        Cheap and non-blocking: the daemon polls it. Once it returns a reason, `generate` raises
        `errors.EngineDead` and in-flight streams end with it."""

    async def probe(self) -> None:
        """One round trip through the engine's work loop that generates nothing: it returns while
        the engine is alive and working, raises `errors.EngineDead` once it has failed, and does
        not return at all while it hangs (the caller bounds the wait: engines/health.py)."""

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """What every engine needs to start, independent of lorabox's settings file."""

    model: str
    dtype: str = "auto"
    max_model_len: int = 4096
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    gpu_memory_utilization: float = 0.90
    tensor_parallel_size: int = 1  # vLLM: GPUs the model is split across
    cpu_kv_cache_gib: int = 4
    log_level: str = "info"
    gguf_model: str = ""  # llama.cpp: the base model's GGUF; empty: converted from `model`
    cache_dir: str = ""  # llama.cpp: where converted GGUF files (base model, adapters) are kept
    parallel: int = 4  # llama.cpp: requests decoded at once
    threads: int = 0  # llama.cpp: CPU threads; 0: one per core
    collect_stats: bool = True  # vLLM: its scheduler's counts and KV-cache use (a little work per step)
