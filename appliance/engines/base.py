"""The engine contract. Engines see token ids and opaque adapter names: no tenants, no HTTP."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version as the engine sees it. `name` is unique per version and content."""

    name: str
    path: str


@dataclass(frozen=True)
class Grammar:
    """What the output must match, in llguidance's terms: both engines compile it with llguidance
    (vLLM's `guidance` structured-output backend; the llama.cpp engine's own matcher), so a
    grammar means the same on either, and the server can check it before an engine sees it."""

    kind: str
    """`json_schema` (text: the schema, as JSON) or `lark` (text: an llguidance Lark grammar)."""
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()

    def serialized(self) -> str:
        """The grammar as llguidance's matcher takes it (what vLLM's guidance backend makes of it)."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.text)
        return LLMatcher.grammar_from_lark(self.text)


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Sampling follows vLLM's order, on every engine: the grammar's mask
    on the model's logits; logprobs from those; then `logit_bias` and `min_tokens` (no stop token
    before it); then the penalties (repetition over prompt and output, presence and frequency
    over the output, as OpenAI defines them); then temperature, top_p and the draw."""

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs, ids within the vocabulary."""
    min_tokens: int = 0
    ignore_eos: bool = False
    """The model's end-of-sequence token does not end the output (`stop_token_ids` still do)."""
    logprobs: int | None = None
    """Alternatives per token to report with their logprobs (0: the chosen token's only); None:
    no logprobs."""
    grammar: Grammar | None = None

    @property
    def plain(self) -> bool:
        """Nothing beyond temperature, top_p and seed shapes the choice of tokens."""
        return (
            self.grammar is None
            and self.logprobs is None
            and not self.logit_bias
            and not self.min_tokens
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the `top` most likely tokens at its place."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """Tokens produced since the previous delta; the last one carries `finish_reason`."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None
    """One per token in `token_ids`, when the request asked for logprobs."""


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


@dataclass(frozen=True)
class AdapterSupport:
    """What of a PEFT LoRA an engine serves exactly (equal to HF transformers + PEFT) where engines
    differ. The adapter check refuses the rest when a version is registered, in one line naming the
    option, this engine and the way out; what no engine serves is refused alike for all
    (adapters/peftconfig.py)."""

    engine: str = ""
    """The engine's name as a reason shows it ("vLLM"); empty: what every engine serves."""
    embedding_lora: bool = False
    """A LoRA on the token embeddings (`embed_tokens` in target_modules)."""
    bias_setting_without_biases: bool = False
    """`bias = "all"` or `"lora_only"` in the config of a base without biases (no bias was trained)."""
    gguf_lora: bool = False
    """An adapter converted by llama.cpp's own tools (adapter_model.gguf) instead of a PEFT folder."""

    @property
    def by(self) -> str:
        return f"the {self.engine} engine" if self.engine else "this engine"


class Engine(Protocol):
    name: str
    adapter_support: AdapterSupport

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
