"""What vLLM knows about its own state: its scheduler's counts and KV-cache use, and its memory.

The scheduler lives in vLLM's engine-core process and reports each step's counts to the front end
through its stat loggers. `scheduler_readout` is a stat logger that only keeps the latest report:
O(1) per engine step on the event loop. It stands in for vLLM's own Prometheus logger (vLLM adds
that one unless a custom logger is one), so vLLM's per-step histograms are not updated: lorabox
exports what it needs itself (telemetry/metrics.py). vLLM calls these stats unstable interfaces;
every read here is guarded, and a vLLM that changes them gives None (N/A), never an error.

The memory figures are computed from vLLM's configuration once the engine has started: weights
from the checkpoint's tensor sizes at the served dtype, the KV cache from the blocks vLLM
allocated, adapter slots from the LoRA buffers it sized for `max_loras` at `max_lora_rank`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapters.drops import BaseModelInfo, model_shards
from ..adapters.residency import slot_bytes
from ..adapters.safetensors_header import read_header
from .base import EngineMemory

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def scheduler_readout(keep: Callable[[Any], None]) -> Any:
    """A vLLM stat-logger class whose instances hand each step's `SchedulerStats` to `keep`."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class SchedulerReadout(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            pass  # registers no Prometheus metric (see the module docstring)

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                keep(scheduler_stats)

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return SchedulerReadout


def _weights_bytes(model_dir: Path, itemsize: int) -> int:
    """The checkpoint's floating-point tensors at the served dtype; others (quantised) as stored."""
    total = 0
    for shard in model_shards(model_dir):
        for info in read_header(shard).values():
            elements = 1
            for dim in info.shape:
                elements *= dim
            total += elements * itemsize if info.dtype in FLOAT_DTYPES else info.nbytes
    return total


def _kv_cache_bytes(vllm_config: Any) -> int:
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    itemsize = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model).itemsize
    per_token = 2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
    return int(cache.num_gpu_blocks) * int(cache.block_size) * per_token * itemsize


def kv_cache_blocks(vllm_config: Any) -> tuple[int, int] | None:
    """(tokens per block, blocks) of the KV cache vLLM allocated; None where its config does not say."""
    try:
        cache = vllm_config.cache_config
        return int(cache.block_size), int(cache.num_gpu_blocks)
    except Exception as exc:  # vLLM's configuration objects are not a stable interface
        log.info("vLLM's KV cache blocks are unknown: %s", exc)
        return None


def engine_memory(vllm_config: Any, model_dir: Path, slots: int, max_lora_rank: int) -> EngineMemory:
    """The engine's memory by use, each figure None where vLLM's configuration does not tell."""

    def guarded(what: str, compute: Callable[[], int]) -> int | None:
        try:
            return compute()
        except Exception as exc:  # vLLM's configuration objects are not a stable interface
            log.info("vLLM's %s size is unknown: %s", what, exc)
            return None

    itemsize = guarded("dtype", lambda: int(vllm_config.model_config.dtype.itemsize))
    if itemsize is None:
        return EngineMemory(kv_cache=guarded("KV cache", lambda: _kv_cache_bytes(vllm_config)))
    return EngineMemory(
        weights=guarded("weights", lambda: _weights_bytes(model_dir, itemsize)),
        kv_cache=guarded("KV cache", lambda: _kv_cache_bytes(vllm_config)),
        adapter_slots=guarded(
            "adapter slots",
            lambda: slots * slot_bytes(BaseModelInfo.from_model_dir(model_dir), max_lora_rank, itemsize),
        ),
    )
