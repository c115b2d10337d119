"""vLLM in-process (`AsyncLLM`) with LoRA: the primary engine, on GPU or vLLM's CPU build."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ..errors import AdapterError
from .base import AdapterRef, EngineOptions, EngineStats, GenerationRequest, TokenDelta

log = logging.getLogger(__name__)

# vLLM accepts only these values for max_lora_rank; the configured limit is rounded up to one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(max_rank: int) -> int:
    return next(r for r in VLLM_LORA_RANKS if r >= max_rank) if max_rank <= VLLM_LORA_RANKS[-1] else max_rank


class VLLMEngine:
    name = "vllm"

    def __init__(self, options: EngineOptions):
        self.options = options
        self._engine: Any = None
        self._device = "unknown"
        # vLLM caches adapters by integer id: one id per adapter name, never reused in a process.
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._loaded: set[str] = set()
        self._running = 0

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        opts = self.options
        self._device = current_platform.device_type
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.cpu_kv_cache_gib))
        args = AsyncEngineArgs(
            model=opts.model,
            dtype=opts.dtype,  # type: ignore[arg-type]
            max_model_len=opts.max_model_len or None,
            enable_lora=True,
            max_loras=opts.max_loras,
            max_cpu_loras=opts.max_cpu_loras,
            max_lora_rank=vllm_lora_rank(opts.max_lora_rank),  # type: ignore[arg-type]
            enable_prefix_caching=True,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            disable_log_stats=True,
        )
        # Construction blocks for the whole model load; a thread keeps the event loop (and
        # /healthz) responsive meanwhile. AsyncLLM binds to the loop lazily, on first request.
        self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        log.info("vLLM engine ready on %s", self._device)

    @property
    def max_model_len(self) -> int:
        return int(self._engine.model_config.max_model_len)

    def _lora_request(self, adapter: AdapterRef) -> Any:
        from vllm.lora.request import LoRARequest

        if adapter.name not in self._ids:
            self._ids[adapter.name] = next(self._next_id)
        return LoRARequest(adapter.name, self._ids[adapter.name], adapter.path)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_token_ids=list(request.stop_token_ids),
            detokenize=False,  # the server detokenises, the same way for every engine
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        lora = self._lora_request(request.adapter) if request.adapter else None
        self._running += 1
        try:
            stream = self._engine.generate(prompt, params, request.request_id, lora_request=lora)
            # aclosing: when our consumer stops early, vLLM's generator is closed now (which
            # aborts the request in the engine), not whenever it is garbage-collected.
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    completion = output.outputs[0]
                    finish = completion.finish_reason if output.finished else None
                    yield TokenDelta(list(completion.token_ids), finish)
        finally:
            self._running -= 1

    async def load_adapter(self, adapter: AdapterRef) -> None:
        try:
            await self._engine.add_lora(self._lora_request(adapter))
        except Exception as exc:  # vLLM raises a variety of types for unloadable weights
            raise AdapterError(f"engine could not load {adapter.name}: {exc}") from exc
        self._loaded.add(adapter.name)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        if adapter.name in self._ids:
            await self._engine.remove_lora(self._ids[adapter.name])
        self._loaded.discard(adapter.name)

    def stats(self) -> EngineStats:
        return EngineStats(
            engine=self.name,
            device=self._device,
            loaded_adapters=sorted(self._loaded),
            running_requests=self._running,
        )

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
