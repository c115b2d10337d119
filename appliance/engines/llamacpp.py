"""llama.cpp in-process (llama-cpp-python's low-level API): the fallback engine, on CPU or CUDA.

The base model is a GGUF file: `gguf_model` when configured (quantised is fine), else the
Hugging Face model converted once into the cache folder. Adapters arrive as PEFT folders, like for
vLLM; each version is converted to a GGUF LoRA against that base (cached by content, off the event
loop) and loaded once. A GGUF LoRA llama.cpp's own tools made may be dropped instead, and is loaded
as it is. A conversion llama.cpp cannot serve is an AdapterError, so the drop is
refused with its reason. All llama.cpp work happens on one thread (see llamacpp_worker.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path

import psutil

from ..errors import EngineDead
from ..gguf.adapterfile import dropped_gguf
from ..gguf.layout import read_hf_config
from ..gguf.lora import BaseGGUF, cached_lora
from ..gguf.model import cached_model, float_type_for
from . import openmp
from .base import AdapterRef, AdapterSupport, EngineOptions, EngineStats, GenerationRequest, TokenDelta
from .llamacpp_grammar import MatcherCache
from .llamacpp_worker import DecodeWorker, Job, WorkerOptions

log = logging.getLogger(__name__)
KV_BLOCK_TOKENS = 16
"""llama.cpp's KV cache has cells, not blocks; reported in blocks of vLLM's default size, so that a
router sizing its prefix index from `vllm:cache_config_info` counts in the units it expects."""


def default_threads(physical: int | None, available: int | None) -> int:
    """llama.cpp's CPU threads when `llamacpp_threads` is 0: one per physical core this process may
    run on (`available`: its CPU affinity), less one, and at least one.

    The core left over is the daemon's own: its event loop turns every step's tokens into the
    stream and feeds the next step. ggml's threads meet at a barrier after each operation, so one
    of them waiting for a core holds all the others; and with OpenMP passive (openmp.py) each
    barrier wakes sleeping threads, which on an idle virtual CPU costs more than a small model's
    operation. Measured on 2 cores (demo model, 4 streamed clients of 64 tokens, side by side, 4
    rounds of 15 s): 1 thread 1,220-1,440 tokens/s; 2 threads 208-256 on the quiet machine and
    640-890 beside one busy process; 2 threads spinning 10,000 rounds before sleeping
    (GOMP_SPINCOUNT) 1,150-1,210 quiet and 44-51 beside the busy process. Boxes of more cores were
    not measured: there the rule gives up one core of many; on a GPU the layers run there anyway."""
    cores = min(physical or 1, available or physical or 1)
    return max(1, cores - 1)


def threads_here() -> int:
    """`default_threads` for this machine and this process's CPU affinity."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return default_threads(psutil.cpu_count(logical=False), available)


def llamacpp_unavailable_reason() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (install the `llamacpp` extra)"
    return None


class LlamaCppEngine:
    name = "llamacpp"
    # Adapters reach llama.cpp converted (gguf/lora.py), or as GGUF LoRAs llama.cpp's tools wrote.
    adapter_support = AdapterSupport("llama.cpp", bias_setting_without_biases=True, gguf_lora=True)

    def __init__(self, options: EngineOptions):
        # llama.cpp's CPU threads are OpenMP's, which spin between steps by default: in-process,
        # on a busy machine, they starved the event loop and each other (demo model, 2 shared
        # cores: 5 tokens/s spinning, 350-900 passive). OpenMP reads the policy once, when it
        # loads: `lorabox serve` sets it before anything does (openmp.py); here for any other
        # process that builds this engine before loading OpenMP.
        openmp.passive()
        # Imported while the daemon is built, before the event loop serves: an import on a worker
        # thread holds the import machinery, and the loop stalls on its next import (measured).
        import llama_cpp  # noqa: F401

        self.options = options
        self.cache_dir = Path(options.cache_dir or Path(options.model).parent / "gguf-cache")
        self.model_path: Path | None = None
        self._worker: DecodeWorker | None = None
        self._base: BaseGGUF | None = None
        self._free: asyncio.Semaphore | None = None  # sequences not held by a request
        self._waiting = 0  # requests waiting for a free sequence
        self._conversions: dict[str, asyncio.Task[Path]] = {}
        self._grammars: MatcherCache | None = None

    async def start(self) -> None:
        opts = self.options
        if opts.gguf_model:
            self.model_path = Path(opts.gguf_model)
        else:
            model_dir = Path(opts.model)
            float_type = float_type_for(read_hf_config(model_dir), opts.dtype)
            log.info("converting %s to GGUF (%s) unless cached in %s", model_dir, float_type, self.cache_dir)
            self.model_path = await asyncio.to_thread(cached_model, model_dir, self.cache_dir, float_type)
        self._base = await asyncio.to_thread(BaseGGUF.read, self.model_path)
        threads = opts.threads or threads_here()
        worker = DecodeWorker(
            WorkerOptions(
                model_path=self.model_path,
                n_ctx_seq=opts.max_model_len,
                parallel=opts.parallel,
                threads=threads,
                # An fp32 model is served with an f32 KV cache and without flash attention: either
                # in f16 moves its logits from the fp32 reference by up to 2e-2, enough to flip a
                # close greedy choice (measured on the demo).
                kv_f32=opts.dtype == "float32",
                max_resident=max(1, opts.max_cpu_loras),
                verbose=opts.log_level == "debug",
            )
        )
        await asyncio.to_thread(worker.start)
        self._worker = worker
        self._grammars = MatcherCache(worker.vocab)
        self._free = asyncio.Semaphore(opts.parallel)
        log.info(
            "llama.cpp engine ready on %s: %s, %d sequences of %d tokens, CPU threads: %d%s",
            self.device,
            self.model_path,
            opts.parallel,
            worker.n_ctx_seq,
            threads,
            "" if opts.threads else " (llamacpp_threads = 0: a core per thread, one left for the daemon)",
        )

    @property
    def device(self) -> str:
        return "cuda" if self._worker is not None and self._worker.gpu else "cpu"

    @property
    def max_batch(self) -> int:
        """Requests decoded at once; more wait for a free sequence, first come first served."""
        return self.options.parallel

    @property
    def max_model_len(self) -> int:
        assert self._worker is not None, "engine not started"
        return self._worker.n_ctx_seq

    def _running_worker(self) -> DecodeWorker:
        if self._worker is None:
            raise EngineDead("the llama.cpp engine is not running")
        if self._worker.failure is not None:
            raise EngineDead(self._worker.failure)
        return self._worker

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        worker = self._running_worker()
        if request.adapter is not None and request.adapter.name not in worker.adapters:
            await self.load_adapter(request.adapter)  # a version asked for by name, not warmed
        matcher = None
        if request.grammar is not None:
            assert self._grammars is not None
            matcher = await self._grammars.matcher(request.grammar)
        free = self._free
        assert free is not None
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        self._waiting += 1
        try:
            await free.acquire()  # the worker releases it once the request holds no sequence
        finally:
            self._waiting -= 1
        job = Job(
            request,
            emit=lambda item: loop.call_soon_threadsafe(stream.put_nowait, item),
            release=lambda: loop.call_soon_threadsafe(free.release),
            matcher=matcher,
        )
        worker.submit(job)
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled = True  # a no-op once finished; otherwise stops it before the next step
            worker.wake()

    async def load_adapter(self, adapter: AdapterRef) -> None:
        worker = self._running_worker()
        base = self._base
        assert base is not None
        # Concurrent loads of one version (a warm-up and a first request) share one conversion.
        task = self._conversions.get(adapter.name)
        if task is None:
            folder = Path(adapter.path)
            # A GGUF LoRA dropped as is (checked at registration) needs no conversion.
            convert = asyncio.to_thread(
                lambda: dropped_gguf(folder) or cached_lora(folder, base, self.cache_dir)
            )
            task = self._conversions[adapter.name] = asyncio.ensure_future(convert)
        try:
            path = await task
        finally:
            if task.done():
                self._conversions.pop(adapter.name, None)
        await asyncio.wrap_future(worker.call(lambda: worker.register(adapter.name, path)))

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        if self._worker is not None and self._worker.failure is None:
            worker = self._worker
            await asyncio.wrap_future(worker.call(lambda: worker.unregister(adapter.name)))

    async def pin_adapter(self, adapter: AdapterRef) -> None:
        worker = self._running_worker()
        if adapter.name not in worker.adapters:
            await self.load_adapter(adapter)
        await asyncio.wrap_future(worker.call(lambda: worker.set_pinned(adapter.name, True)))

    async def unpin_adapter(self, adapter: AdapterRef) -> None:
        worker = self._running_worker()
        await asyncio.wrap_future(worker.call(lambda: worker.set_pinned(adapter.name, False)))

    def failure(self) -> str | None:
        return self._worker.failure if self._worker is not None else None

    async def probe(self) -> None:
        # A no-op run on the worker thread between two decode steps: it proves the thread and its
        # loop alive and answering; a dead worker fails the call with EngineDead.
        worker = self._running_worker()
        await asyncio.wrap_future(worker.call(lambda: None))

    def stats(self) -> EngineStats:
        worker = self._worker
        adapters = list(worker.adapters.values()) if worker else []
        cells = worker.n_ctx_seq * self.options.parallel if worker else 0
        # The KV cells the running requests hold (sequences kept for prefix reuse are free to take,
        # as vLLM counts its cached blocks). Read off the worker's thread: a list copy, no lock.
        held = sum(len(job.sequence.tokens) for job in list(worker.running) if job.sequence) if worker else 0
        return EngineStats(
            engine=self.name,
            device=self.device,
            loaded_adapters=sorted(a.name for a in adapters),
            running_requests=len(worker.running) if worker else 0,
            waiting_requests=self._waiting,
            kv_cache_usage=min(1.0, held / cells) if cells else None,
            kv_cache_blocks=(KV_BLOCK_TOKENS, cells // KV_BLOCK_TOKENS) if cells else None,
            pinned=sorted(a.name for a in adapters if a.pinned),
            extra={
                "model": str(self.model_path) if self.model_path else None,
                "parallel": self.options.parallel,
                "resident_adapters": sum(a.handle is not None for a in adapters),
                "adapter_switches": worker.adapter_switches if worker else 0,
                "prefix_reused_tokens": worker.prefix_reused_tokens if worker else 0,
                "generated_tokens": worker.generated_tokens if worker else 0,
            },
        )

    async def shutdown(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.stop)
