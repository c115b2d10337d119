"""Device readings: taken off the event loop, shared, never stuck behind NVML; N/A when NVML fails."""

from __future__ import annotations

import asyncio
import threading

import pytest
from textual.widgets import Static

from appliance.api.overview import device_payload
from appliance.engines.base import EngineMemory, EngineStats
from appliance.telemetry import gpu
from appliance.telemetry.device import DeviceReading, DeviceSampler, take_reading
from appliance.telemetry.host import HostReading
from appliance.telemetry.metrics import MetricsSnapshot, render
from appliance.telemetry.stats import TrafficStats
from appliance.testing.adminreplay import AdminReplay
from appliance.testing.loadclock import LoadClock
from tests.test_gpu import nvml_raising_everywhere
from tests.test_tui import SIZE, loaded, make_app
from tui.widgets.device import DevicePanel

HOST = HostReading(memory_total=8 << 30, memory_used=2 << 30, cpu_pct=12.5, cpus=2)


@pytest.fixture(autouse=True)
def _fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_nvml_ready", None)
    monkeypatch.setattr(gpu, "_cache", {})


def engine(device: str) -> EngineStats:
    memory = EngineMemory(weights=16 << 30, kv_cache=3 << 30, adapter_slots=1 << 29)
    return EngineStats(engine="vllm", device=device, memory=memory)


async def test_readings_are_shared_within_the_ttl() -> None:
    taken: list[str] = []

    def take() -> DeviceReading:
        taken.append(threading.current_thread().name)
        return DeviceReading((), HOST)

    sampler = DeviceSampler(take, ttl_s=60)
    readings = await asyncio.gather(*(sampler.read() for _ in range(5)))
    assert readings == [DeviceReading((), HOST)] * 5
    await sampler.read()
    assert len(taken) == 1
    assert taken[0] != threading.current_thread().name, "read on a thread of its own"


async def test_a_stuck_reading_is_not_waited_for_and_not_repeated() -> None:
    release, calls = threading.Event(), []

    def stuck() -> DeviceReading:
        calls.append(1)
        release.wait(30)
        return DeviceReading((), HOST)

    sampler = DeviceSampler(stuck, ttl_s=0, wait_s=0.2)
    clock = LoadClock()
    assert await sampler.read() == DeviceReading()  # nothing known yet: all N/A
    assert await sampler.read() == DeviceReading()
    assert clock.elapsed_s() < 2  # two waits of 0.2 s (of the time the loop was not kept waiting)
    assert len(calls) == 1, "no second thread while the first is stuck"
    release.set()
    for _ in range(100):
        if await sampler.read() == DeviceReading((), HOST):
            break
        await asyncio.sleep(0.05)
    assert await sampler.read() == DeviceReading((), HOST)


async def test_a_failing_reader_keeps_the_last_reading() -> None:
    answers: list[DeviceReading | Exception] = [DeviceReading((), HOST), RuntimeError("bug")]

    def take() -> DeviceReading:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sampler = DeviceSampler(take, ttl_s=0)
    assert await sampler.read() == DeviceReading((), HOST)
    assert await sampler.read() == DeviceReading((), HOST)


def test_cpu_only_box_says_so() -> None:
    payload = device_payload(DeviceReading((), HOST), engine("cpu"))
    assert payload["kind"] == "cpu"
    assert payload["gpus"] == []
    assert payload["vram_split"] is None
    assert payload["host"] == {"memory_total": 8 << 30, "memory_used": 2 << 30, "cpu_pct": 12.5, "cpus": 2}


def test_vram_split_adds_up_to_what_the_gpu_reports() -> None:
    reading = DeviceReading((gpu.GpuReading(0, memory_total=24 << 30, memory_used=21 << 30),), HOST)
    split = device_payload(reading, engine("cuda"))["vram_split"]
    assert split == {
        "base_weights": 16 << 30,
        "kv_cache": 3 << 30,
        "adapter_slots": 1 << 29,
        "other": (21 << 30) - (16 << 30) - (3 << 30) - (1 << 29),
    }


@pytest.mark.parametrize("init_works", [False, True], ids=["nvml-absent", "every-call-raises"])
async def test_nvml_failing_shows_na_everywhere_and_nothing_stops(
    monkeypatch: pytest.MonkeyPatch, replay: AdminReplay, init_works: bool
) -> None:
    nvml_raising_everywhere(monkeypatch, except_init=init_works)
    if init_works:  # NVML starts and counts one GPU, then every call about it raises
        monkeypatch.setattr("pynvml.nvmlDeviceGetCount", lambda: 1)
    reading = await DeviceSampler(take_reading).read()
    assert [g.index for g in reading.gpus] == ([0] if init_works else [])
    device = device_payload(reading, engine("cuda"))  # the engine runs on a GPU NVML cannot read
    assert device["kind"] == "gpu"
    assert device["vram_split"]["other"] is None
    assert all(value is None for g in device["gpus"] for key, value in g.items() if key != "index")
    status = replay.status | {"device": device}
    names = render(MetricsSnapshot.take(TrafficStats(), status, [])).decode()
    assert "lorabox_gpu_memory_total_bytes{" not in names
    assert "lorabox_host_memory_total_bytes" in names

    replay.status = status
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        shown = str(app.main.query_one(DevicePanel).render())
        if init_works:
            assert "GPU 0 N/A" in shown
            assert "util N/A" in shown
            assert "VRAM N/A / N/A" in shown
        else:
            assert "GPU N/A: the daemon cannot read the GPU (NVML)" in shown
        assert app.is_running
        assert app.main.query_one("#header", Static).display
