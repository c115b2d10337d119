"""The model server protocol (Gateway API Inference Extension, proposal 003) on the metrics listener:
every family the endpoint picker reads, under vLLM's names and types, parsed by prometheus_client's
own parser; a tenant's adapter among the running ones while its requests run, and not after; the
same on both engines; and lorabox's families never mixed with a `vllm:` family some other code
registers in prometheus_client's default registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, Gauge
from prometheus_client.parser import text_string_to_metric_families

from appliance.telemetry.protocol import ProtocolSnapshot, render
from tests.conftest import Server
from tests.heldstreams import PROTOCOL_FAMILIES, gauge, held_streams, in_flight_scrape, lora_info, scrape

TENANT = "acme"


def families(text: bytes) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def test_every_family_the_picker_reads_with_its_type_and_value() -> None:
    snapshot = ProtocolSnapshot(
        model_name="lorabox-demo",
        waiting=5,
        running=3,
        kv_cache_usage=0.25,
        max_lora=4,
        running_adapters=["acme", "globex@v2"],
        waiting_adapters=["initech"],
        kv_cache_blocks=(16, 4096),
        at=1_800_000_000.0,
    )
    found = families(render(snapshot))
    assert {name: found[name].type for name in PROTOCOL_FAMILIES} == PROTOCOL_FAMILIES  # type: ignore[attr-defined]
    assert gauge(found, "vllm:num_requests_waiting") == 5
    assert gauge(found, "vllm:num_requests_running") == 3
    assert gauge(found, "vllm:kv_cache_usage_perc") == 0.25
    info = lora_info(found)
    assert info == {"running": {"acme", "globex@v2"}, "waiting": {"initech"}, "max_lora": 4, "at": 1.8e9}
    [cache] = found["vllm:cache_config_info"].samples  # type: ignore[attr-defined]
    assert (cache.labels["block_size"], cache.labels["num_gpu_blocks"], cache.value) == ("16", "4096", 1)


def test_unknown_values_are_left_out_until_the_engine_runs() -> None:
    found = families(render(ProtocolSnapshot(model_name="m", waiting=2, running=0)))
    assert set(found) == {"vllm:num_requests_waiting", "vllm:num_requests_running"}


@pytest.fixture
def clashing_vllm_gauge() -> Iterator[None]:
    """What vLLM's own Prometheus logger would do in-process: its gauge in the default registry."""
    clash = Gauge("vllm:num_requests_waiting", "vLLM's own", registry=REGISTRY)
    clash.set(999)
    yield
    REGISTRY.unregister(clash)


def test_a_vllm_family_in_the_default_registry_never_reaches_the_output(clashing_vllm_gauge: None) -> None:
    text = render(ProtocolSnapshot(model_name="m", waiting=7, running=1)).decode()
    assert text.count("# TYPE vllm:num_requests_waiting gauge") == 1
    assert gauge(families(text.encode()), "vllm:num_requests_waiting") == 7


@pytest.fixture(params=["server", "llamacpp_server"])
def box(request: pytest.FixtureRequest) -> Server:
    """The shared vLLM daemon, then the shared llama.cpp one: the same protocol on both engines."""
    server: Server = request.getfixturevalue(request.param)
    return server


def test_the_listener_serves_the_protocol_and_a_streaming_tenant_is_running_then_not(box: Server) -> None:
    metrics, key = box.local.metrics_url, box.demo.keys[TENANT]
    idle = scrape(metrics)
    assert {name: idle[name].type for name in PROTOCOL_FAMILIES} == PROTOCOL_FAMILIES
    assert lora_info(idle)["max_lora"] >= 1
    assert 0.0 <= gauge(idle, "vllm:kv_cache_usage_perc") <= 1.0

    while_streaming = in_flight_scrape(
        lambda: scrape(metrics),
        lambda: TENANT in lora_info(scrape(metrics))["running"],
        lambda: held_streams(box.url, key, TENANT),
    )
    assert TENANT in lora_info(while_streaming)["running"]
    assert gauge(while_streaming, "vllm:num_requests_running") >= 1

    after = scrape(metrics)  # every stream read to its [DONE]: each request has ended
    assert TENANT not in lora_info(after)["running"] | lora_info(after)["waiting"]
    assert lora_info(after)["at"] >= lora_info(while_streaming)["at"]
