"""The model server protocol's metrics, for routers that pick a box per request.

The Gateway API Inference Extension's endpoint picker (and llm-d's router, its successor) scrapes
each model server's Prometheus endpoint for what its scorers read, under vLLM's names
(docs/proposals/003-model-server-protocol in kubernetes-sigs/gateway-api-inference-extension):

| metric | type | lorabox's value |
|---|---|---|
| `vllm:num_requests_waiting` | gauge | requests in lorabox's fair queue + those waiting inside the engine |
| `vllm:num_requests_running` | gauge | requests the engine is generating for |
| `vllm:kv_cache_usage_perc` | gauge | KV cache in use, 0-1 (1 = full), as vLLM's |
| `vllm:lora_requests_info` | gauge | now (Unix time; the picker takes the newest series), labels below |
| `vllm:cache_config_info` | gauge (1) | labels `block_size`, `num_gpu_blocks`: the KV cache's size |

`vllm:lora_requests_info`'s labels are `max_lora`, `running_lora_adapters` and
`waiting_lora_adapters` (comma separated). The adapters are named as requests name them in
`model` (`acme`, `acme@v2`): the picker matches a request's `model` against them. Running: the
adapters of requests the fair queue has let go to the engine; waiting: of those still in the
queue. `max_lora` is how many adapters one batch may hold (vLLM's GPU slots; llama.cpp's
sequences, one adapter each at most). The same on both engines.

These families are rendered from lorabox's own copy of its state into a registry of their own,
like lorabox's other metrics: never from prometheus_client's default registry, where vLLM would
register its own families of these names if lorabox let it (it does not: engines/vllm_stats.py
replaces vLLM's Prometheus logger). So each name appears once, with lorabox's meaning.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

ENGINE_LABEL = "0"  # vLLM labels its series by engine index; lorabox runs one engine


@dataclass(frozen=True)
class ProtocolSnapshot:
    model_name: str
    """The base model's served name (vLLM's `model_name` label)."""
    waiting: int
    running: int
    kv_cache_usage: float | None = None
    max_lora: int | None = None
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    kv_cache_blocks: tuple[int, int] | None = None
    at: float = field(default_factory=time.time)


class _Collector(Collector):
    def __init__(self, snapshot: ProtocolSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        labels = ["model_name", "engine"]
        for name, doc, value in (
            (
                "vllm:num_requests_waiting",
                "Requests waiting: lorabox's fair queue and the engine's.",
                s.waiting,
            ),
            ("vllm:num_requests_running", "Requests the engine is generating for.", s.running),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
        ):
            if value is not None:
                family = GaugeMetricFamily(name, doc, labels=labels)
                family.add_metric([s.model_name, ENGINE_LABEL], value)
                yield family
        if s.max_lora is not None:
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "LoRA adapters with requests running and waiting (as requests name them); the value is "
                "when this was read.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            lora.add_metric(
                [str(s.max_lora), ",".join(s.waiting_adapters), ",".join(s.running_adapters)], s.at
            )
            yield lora
        if s.kv_cache_blocks is not None:
            cache = GaugeMetricFamily(
                "vllm:cache_config_info",
                "The KV cache: tokens per block and blocks.",
                labels=["block_size", "num_gpu_blocks", "engine"],
            )
            cache.add_metric([str(s.kv_cache_blocks[0]), str(s.kv_cache_blocks[1]), ENGINE_LABEL], 1)
            yield cache


def render(snapshot: ProtocolSnapshot) -> bytes:
    """The Prometheus text format (0.0.4) of a snapshot, from a registry of its own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))
    return generate_latest(registry)
