"""lorabox's vLLM plugin: one change to vLLM's LoRA bookkeeping that a box with many tenants needs.

vLLM loads it (the entry point `vllm.general_plugins` in pyproject.toml) in each of its processes,
the engine core's worker included, where the model runs; nothing of lorabox is imported there but
this module.

Every engine step, vLLM 0.32's worker asks, for each adapter the step's requests use, whether that
adapter is in its host-memory cache (`LRUCacheWorkerLoRAManager.add_adapter`), and answers by
building the set of every cached adapter's id: `WorkerLoRAManager.list_adapters` is
`set(LoRAModelManager.list_adapters())`, which copies the cache into a dict through a `UserDict`,
one Python call per entry. lorabox keeps every tenant's adapter in that cache where host memory
allows (adapters/residency.py sizes `max_cpu_loras`), so the cost grows with the tenants of the box,
not with the step: with 1,000 adapters cached it was 13% of the worker's time on the demo model
(py-spy), and the box served 0.70-0.87x the tokens/s of the same box with 5 (`python -m benchmarks
scale`). Here the same set is built from the cache's own key order, in C.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

TARGET = "vllm.lora.worker_manager"
"""The module changed, in the processes that import it (vLLM's worker): vLLM loads its plugins in
the daemon's process too, where importing it would hold the event loop (344-431 ms measured), so
the change waits for the module's own import."""
PATCHED = "_lorabox_keys_in_c"


def cached_adapter_ids(worker_manager: Any) -> set[int]:
    """The ids of the adapters in the worker's host-memory cache: what vLLM's own
    `list_adapters` returns, without a Python call per adapter."""
    manager = worker_manager._adapter_manager
    order = getattr(getattr(manager, "_registered_adapters", None), "order", None)
    if order is None:  # a vLLM whose cache is built otherwise: its own way
        return set(manager.list_adapters())
    return set(order)


def patch(worker_manager: ModuleType) -> None:
    """Change `WorkerLoRAManager.list_adapters` in vLLM's module (once). Where this vLLM's LoRA
    cache keeps no key order, vLLM's own lookups stay, and a warning says so: in vLLM's worker it
    reaches the daemon's log through the engine-log filter (enginelog.py)."""
    from vllm.utils.cache import LRUCache

    manager_class = worker_manager.WorkerLoRAManager
    if getattr(manager_class.list_adapters, PATCHED, False):
        return
    if not isinstance(getattr(LRUCache, "order", None), property):
        log.warning(
            "lorabox: this vLLM's LoRA cache keeps no key order: its worker's lookups of cached "
            "adapters stay as vLLM has them (their cost grows with the adapters cached)"
        )
        return

    def list_adapters(self: Any) -> set[int]:
        return cached_adapter_ids(self)

    setattr(list_adapters, PATCHED, True)
    manager_class.list_adapters = list_adapters


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds TARGET as the path finder would, and patches it once its code has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register() -> None:
    """The plugin's entry point (vLLM may call it more than once in one process): patches TARGET
    now if it is imported, else when it is."""
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(finder, PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, PatchOnImport())
        log.info("lorabox: vLLM plugin loaded: vLLM's LoRA worker will look up cached adapters by key order")
