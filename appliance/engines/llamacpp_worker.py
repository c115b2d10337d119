"""The thread that owns a llama.cpp model and context; every llama.cpp call happens on it.

The context holds `parallel` sequences, each with its own KV cells (llama.cpp's non-unified KV
cache) of `n_ctx_seq` positions. A request is admitted to a free sequence; then every step groups
the running requests by adapter and runs one `llama_decode` per group with that adapter set
(`llama_set_adapters_lora`, empty for the base model). Requests on one adapter share a batch;
requests on different adapters take turns, one decode each per step. A long prompt is fed in
chunks of at most BATCH_TOKENS tokens, so it cannot hold the others back for long.

Cache isolation: when a request ends, its sequence keeps the KV of the tokens it decoded, labelled
with (adapter, cache salt). A new request reuses that prefix only if its own adapter and salt are
the same and its prompt starts the same way; a request with any other label that takes the
sequence clears it first. No KV computed under one adapter or one tenant's salt serves another.

The event loop talks to this thread through `submit` (a request), `call` (run a function here,
between steps) and `Job.cancelled` (checked before every step). Each job's `release` runs exactly
once, when the job no longer holds a sequence: the engine counts free sequences with it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterError, EngineDead
from .base import GenerationRequest, TokenDelta, TokenLogprob
from .llamacpp_sampling import TokenSampler, sampler_for

log = logging.getLogger(__name__)

# Tokens per llama_decode call: a step's budget across the requests of one adapter.
BATCH_TOKENS = 512


@dataclass(eq=False)
class Job:
    """One request. The event loop sets `cancelled`; everything else belongs to the worker."""

    request: GenerationRequest
    emit: Callable[[TokenDelta | BaseException], object]  # thread-safe, to the request's stream
    release: Callable[[], object]  # thread-safe: the job holds no sequence any more
    cancelled: bool = False
    sequence: Sequence | None = None
    pending: list[int] = field(default_factory=list)  # tokens to decode next
    generated: int = 0
    matcher: Any = None  # the request's grammar, compiled (llamacpp_grammar.py), set before submit
    sampler: TokenSampler | None = None

    @property
    def adapter(self) -> str | None:
        return self.request.adapter.name if self.request.adapter else None


@dataclass(eq=False)
class Sequence:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # whose KV this sequence holds, in order
    label: tuple[str | None, str] | None = None  # (adapter, cache salt) they were computed under
    job: Job | None = None
    last_used: float = 0.0


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path
    handle: Any = None  # llama_adapter_lora pointer while resident
    pinned: bool = False
    users: int = 0  # running requests
    retired: bool = False  # unregistered while in use: freed when its last request ends
    last_used: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class WorkerOptions:
    model_path: Path
    n_ctx_seq: int  # positions per sequence (prompt + completion); 0: the model's own
    parallel: int  # sequences, i.e. requests decoded at once
    threads: int
    kv_f32: bool  # exact parity with an fp32 reference: f32 KV cache, no flash attention
    max_resident: int  # adapters kept loaded; the least recently used idle one makes room
    verbose: bool = False


class DecodeWorker:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.failure: str | None = None
        self.n_ctx_seq = 0
        self.n_vocab = 0
        self.vocab: Any = None
        self.gpu = False
        self.prefix_reused_tokens = 0
        self.adapter_switches = 0
        self.generated_tokens = 0
        self.adapters: dict[str, Adapter] = {}
        self.running: list[Job] = []
        self._inbox: list[Job] = []
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._sequences: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._current: str | None = None  # adapter set on the context
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None

    # -- the event loop's side ------------------------------------------------------------------

    def start(self) -> None:
        """Load the model and start the thread. Blocking: call it off the event loop."""
        self._load()
        self._thread = threading.Thread(target=self._run, name="llama.cpp", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self.failure is not None:
                job.emit(EngineDead(self.failure))
                job.release()
                return
            self._inbox.append(job)
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the worker thread between two steps; its result or exception in the future."""
        future: Future[Any] = Future()
        with self._wake:
            if self.failure is not None:
                future.set_exception(EngineDead(self.failure))
                return future
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        """Stop the thread and free everything llama.cpp holds. Blocking."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self._free()

    # -- set-up and tear-down -------------------------------------------------------------------

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import llama_cpp as lib

        llama_cpp.llama_cpp.llama_backend_init()
        llama_cpp._logger.set_verbose(self.options.verbose)  # type: ignore[attr-defined]
        self._lib = lib
        self.gpu = bool(lib.llama_supports_gpu_offload())
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 999 if self.gpu else 0  # every layer on the GPU when there is one
        self._model = lib.llama_model_load_from_file(str(self.options.model_path).encode(), model_params)
        if not self._model:
            raise EngineDead(f"llama.cpp could not load {self.options.model_path}")
        n_ctx_seq = self.options.n_ctx_seq or lib.llama_model_n_ctx_train(self._model)
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx_seq * self.options.parallel
        params.n_seq_max = self.options.parallel
        params.kv_unified = False  # each sequence its own cells: sizes are predictable, caches separate
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_threads = params.n_threads_batch = self.options.threads
        if self.options.kv_f32:
            params.type_k = params.type_v = lib.GGML_TYPE_F32
            # Flash attention (on by default where supported) computes in f16: logits then differ
            # from an fp32 reference by up to 2e-2 even with an f32 cache (measured, CPU).
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        else:
            params.type_k = params.type_v = lib.GGML_TYPE_F16
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise EngineDead("llama.cpp could not create a context (too little memory for the KV cache?)")
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(self._ctx))
        self.vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._sequences = [Sequence(seq_id) for seq_id in range(self.options.parallel)]

    def _free(self) -> None:
        lib = self._lib
        if lib is None:
            return
        for adapter in self.adapters.values():
            self._unload(adapter)
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._next_round():
                self._step()
        except BaseException as exc:
            log.exception("the llama.cpp worker failed")
            self._die(f"the llama.cpp worker thread died: {exc!r}")

    def _die(self, reason: str) -> None:
        with self._wake:
            self.failure = reason
            jobs, self._inbox = self.running + self._inbox, []
            calls, self._calls = self._calls, []
        for job in jobs:
            job.emit(EngineDead(reason))
            job.release()
        for _, future in calls:
            future.set_exception(EngineDead(reason))

    def _next_round(self) -> bool:
        """Wait for work; run queued calls, drop cancelled jobs, admit new ones. False: stop."""
        with self._wake:
            while not (self._stopping or self._calls or self._inbox or self.running):
                self._wake.wait()
            if self._stopping:
                self._abort_all()
                return False
            calls, self._calls = self._calls, []
            inbox, self._inbox = self._inbox, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
        for job in [j for j in self.running if j.cancelled]:
            self._finish(job)
        waiting = []
        for job in inbox:
            if job.cancelled:
                job.release()
            elif not self._admit(job):
                waiting.append(job)
        if waiting:  # no free sequence yet (a finished job's release is still on its way)
            with self._wake:
                self._inbox[:0] = waiting
        return True

    def _abort_all(self) -> None:
        for job in [*self.running, *self._inbox]:
            job.emit(TokenDelta([], "abort"))
            job.release()
        self.running, self._inbox = [], []

    # -- admission ------------------------------------------------------------------------------

    def _admit(self, job: Job) -> bool:
        free = [s for s in self._sequences if s.job is None]
        if not free:
            return False
        prompt, label = job.request.prompt_token_ids, (job.adapter, job.request.cache_salt)
        # Checked here, one request at a time: in a shared batch they would fail every request in it.
        problem = self._request_problem(job.request)
        if problem is not None:
            job.emit(ValueError(problem))
            job.release()
            return True
        same = [s for s in free if s.label == label]
        best = max(same, key=lambda s: common_prefix(s.tokens, prompt), default=None)
        # At least the last prompt token is decoded again: its logits give the first new token.
        reuse = min(common_prefix(best.tokens, prompt), len(prompt) - 1) if best is not None else 0
        # Without a prefix to reuse, the least recently used sequence: others' recent prefixes stay.
        sequence = best if best is not None and reuse > 0 else min(free, key=lambda s: s.last_used)
        self._lib.llama_memory_seq_rm(self._mem, sequence.seq_id, reuse, -1)
        sequence.tokens, sequence.label = sequence.tokens[:reuse], label
        try:
            if job.adapter is not None:
                self._resident(job.adapter).users += 1
        except AdapterError as exc:
            sequence.tokens, sequence.label = [], None
            job.emit(exc)
            job.release()
            return True
        self.prefix_reused_tokens += reuse
        sequence.job, job.sequence = job, sequence
        job.pending = prompt[reuse:]
        job.sampler = sampler_for(self._lib, job.request, self.n_vocab, job.matcher)
        self.running.append(job)
        return True

    def _request_problem(self, request: GenerationRequest) -> str | None:
        prompt = request.prompt_token_ids
        if not prompt:
            return "the prompt is empty"
        if len(prompt) >= self.n_ctx_seq:
            return f"the prompt has {len(prompt)} tokens; a sequence holds {self.n_ctx_seq}"
        if min(prompt) < 0 or max(prompt) >= self.n_vocab:
            return f"the prompt has token ids outside the vocabulary (0-{self.n_vocab - 1})"
        if any(not 0 <= token < self.n_vocab for token, _ in request.logit_bias):
            return f"logit_bias names token ids outside the vocabulary (0-{self.n_vocab - 1})"
        return None

    def _finish(self, job: Job, error: BaseException | None = None, *, announced: bool = False) -> None:
        """End a running job: free its sampler and sequence; tell its stream, unless `announced`."""
        if job.sampler is not None:
            job.sampler.free()
            job.sampler = None
        sequence = job.sequence
        if sequence is not None:
            sequence.job, sequence.last_used = None, time.monotonic()
            if error is not None:  # its KV may be half written: forget it
                self._lib.llama_memory_seq_rm(self._mem, sequence.seq_id, 0, -1)
                sequence.tokens, sequence.label = [], None
        adapter = self.adapters.get(job.adapter) if job.adapter is not None else None
        if adapter is not None:
            adapter.users -= 1
            adapter.last_used = time.monotonic()
            if adapter.retired and adapter.users == 0:
                self._unload(self.adapters.pop(adapter.name))
        self.running.remove(job)
        if error is not None:
            job.emit(error)
        elif not announced:
            job.emit(TokenDelta([], "abort"))
        job.release()

    # -- adapters -------------------------------------------------------------------------------

    def register(self, name: str, path: Path) -> None:
        """Know an adapter by name and load it now, so that its first request pays no load."""
        adapter = self.adapters.setdefault(name, Adapter(name, path))  # a name never changes content
        adapter.retired = False
        self._resident(name)

    def unregister(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is None:
            return
        if adapter.users:
            adapter.retired = True
        else:
            self._unload(self.adapters.pop(name))

    def set_pinned(self, name: str, pinned: bool) -> None:
        """A pinned adapter is never unloaded to make room for another."""
        if pinned:
            self._resident(name).pinned = True
        elif name in self.adapters:
            self.adapters[name].pinned = False

    def _resident(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise AdapterError(f"adapter {name} is not registered with the llama.cpp engine")
        adapter.last_used = time.monotonic()
        if adapter.handle is not None:
            return adapter
        loaded = [a for a in self.adapters.values() if a.handle is not None]
        idle = sorted((a for a in loaded if not a.users and not a.pinned), key=lambda a: a.last_used)
        for victim in idle[: max(0, len(loaded) + 1 - self.options.max_resident)]:
            self._unload(victim)
        handle = self._lib.llama_adapter_lora_init(self._model, str(adapter.path).encode())
        if not handle:
            raise AdapterError(f"llama.cpp could not load the converted adapter {adapter.name}")
        adapter.handle = handle
        return adapter

    def _unload(self, adapter: Adapter) -> None:
        if adapter.handle is None:
            return
        if self._current == adapter.name:
            self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)
            self._current = None
        self._lib.llama_adapter_lora_free(adapter.handle)
        adapter.handle = None

    def _use(self, name: str | None) -> None:
        if name == self._current:
            return
        lib = self._lib
        if name is None:
            lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handle = self.adapters[name].handle
            handles = (lib.llama_adapter_lora_p_ctypes * 1)(handle)
            lib.llama_set_adapters_lora(self._ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        self._current = name
        self.adapter_switches += 1

    # -- one step -------------------------------------------------------------------------------

    def _step(self) -> None:
        groups: dict[str | None, list[Job]] = {}
        for job in self.running:
            groups.setdefault(job.adapter, []).append(job)
        # Start with the adapter already set: one switch fewer per step.
        for name in sorted(groups, key=lambda n: n != self._current):
            self._use(name)
            self._decode(groups[name])

    def _decode(self, jobs: list[Job]) -> None:
        lib, batch = self._lib, self._batch
        budget, n = BATCH_TOKENS, 0
        fed: list[tuple[Job, list[int], int | None]] = []  # (job, tokens fed, batch index of logits)
        # Running generations first (one token each), then prompt chunks in arrival order.
        for job in sorted(jobs, key=lambda j: len(j.pending) > 1):
            if budget == 0:
                break
            sequence = job.sequence
            assert sequence is not None
            chunk = job.pending[:budget]
            start = len(sequence.tokens)
            for i, token in enumerate(chunk):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sequence.seq_id
                batch.logits[n] = False
                n += 1
            wants_logits = len(chunk) == len(job.pending)
            if wants_logits:
                batch.logits[n - 1] = True
            fed.append((job, chunk, n - 1 if wants_logits else None))
            budget -= len(chunk)
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            error = RuntimeError(f"llama_decode failed with status {status}")
            for job, _, _ in fed:
                self._finish(job, error)
            return
        for job, chunk, logits_at in fed:
            assert job.sequence is not None
            job.sequence.tokens.extend(chunk)
            job.pending = job.pending[len(chunk) :]
            if logits_at is not None:
                assert job.sampler is not None
                self._emit(job, *job.sampler.sample(self._ctx, logits_at))

    def _emit(self, job: Job, token: int, logprob: TokenLogprob | None) -> None:
        job.generated += 1
        self.generated_tokens += 1
        request = job.request
        assert job.sequence is not None
        finish = None
        if token in request.stop_token_ids:
            finish = "stop"
        elif job.generated >= request.max_tokens or len(job.sequence.tokens) >= self.n_ctx_seq:
            finish = "length"
        job.emit(TokenDelta([token], finish, [logprob] if logprob is not None else None))
        if finish is None:
            job.pending = [token]
        else:
            self._finish(job, announced=True)
