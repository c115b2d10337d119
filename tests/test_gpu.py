"""NVML wrapper: None instead of exceptions, one nvmlInit, and a TTL cache in front of the driver."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from appliance.telemetry import gpu


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_nvml_ready", None)
    monkeypatch.setattr(gpu, "_cache", {})


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Set now[0] to move time; the module reads it as its monotonic clock."""
    now = [1000.0]
    monkeypatch.setattr(gpu, "_clock", lambda: now[0])
    return now


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A pretend 80 GiB GPU 0; the returned dict counts calls per NVML function."""
    calls = {"init": 0, "memory": 0, "name": 0}
    gib = 1 << 30

    def init() -> None:
        calls["init"] += 1

    def memory(handle: object) -> SimpleNamespace:
        assert handle == "gpu0"
        calls["memory"] += 1
        return SimpleNamespace(total=80 * gib, used=30 * gib, free=50 * gib)

    def name(handle: object) -> bytes:
        calls["name"] += 1
        return b"NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: f"gpu{index}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", name)
    return calls


def test_real_nvml_never_raises() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        has_driver = False
    else:
        has_driver = True
    memory = gpu.gpu_memory()
    if has_driver:
        assert memory is not None
        assert memory.total > 0
        assert memory.used + memory.free <= memory.total
        assert gpu.gpu_name()
    else:  # this development machine: no NVIDIA driver
        assert memory is None
        assert gpu.gpu_name() is None


def test_missing_library_reads_as_none_and_init_is_not_retried(
    monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    tries = []

    def init() -> None:
        tries.append(1)
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    assert gpu.gpu_memory() is None
    clock[0] += 10
    assert gpu.gpu_memory() is None
    assert gpu.gpu_name() is None
    assert len(tries) == 1


def test_fake_device_values(fake_device: dict[str, int], clock: list[float]) -> None:
    memory = gpu.gpu_memory()
    assert memory == gpu.GpuMemory(total=80 << 30, used=30 << 30, free=50 << 30)
    assert gpu.gpu_name() == "NVIDIA H100 80GB HBM3"
    assert fake_device["init"] == 1


def test_ttl_cache_avoids_a_second_call(fake_device: dict[str, int], clock: list[float]) -> None:
    gpu.gpu_memory()
    clock[0] += gpu.TTL_SECONDS / 2
    gpu.gpu_memory()
    assert fake_device["memory"] == 1
    clock[0] += gpu.TTL_SECONDS
    gpu.gpu_memory()
    assert fake_device["memory"] == 2
    assert fake_device["name"] == 0  # name and memory are cached separately
    assert fake_device["init"] == 1


def test_nvml_error_after_init_reads_as_none(
    monkeypatch: pytest.MonkeyPatch, fake_device: dict[str, int], clock: list[float]
) -> None:
    def lost(handle: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lost)
    assert gpu.gpu_memory() is None
    assert gpu.gpu_name() == "NVIDIA H100 80GB HBM3"


def nvml_raising_everywhere(monkeypatch: pytest.MonkeyPatch, *, except_init: bool = False) -> None:
    """Every NVML function of the binding raises (as with a driver that is broken or gone)."""

    def broken(*args: object, **kwargs: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    for name in dir(pynvml):
        if name.startswith("nvml") and callable(getattr(pynvml, name)):
            monkeypatch.setattr(pynvml, name, broken)
    if except_init:
        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)


@pytest.fixture
def full_device(monkeypatch: pytest.MonkeyPatch, fake_device: dict[str, int]) -> None:
    """Two pretend GPUs with everything NVML can tell; pid 4242 uses 3 GiB of GPU 1."""
    gib = 1 << 30

    def memory(handle: str, version: int | None = None) -> SimpleNamespace:
        if version is None:  # v1 counts the driver's reserved memory as used
            return SimpleNamespace(total=80 * gib, used=31 * gib, free=49 * gib)
        assert version == pynvml.nvmlMemory_v2
        return SimpleNamespace(total=80 * gib, used=30 * gib, free=49 * gib, reserved=gib)

    processes = {
        "gpu1": [SimpleNamespace(pid=4242, usedGpuMemory=3 * gib), SimpleNamespace(pid=1, usedGpuMemory=gib)]
    }
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=87, memory=40))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", lambda h, sensor: 64)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: 301_500)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetEnforcedPowerLimit", lambda h: 450_000)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: processes.get(h, []))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetGraphicsRunningProcesses", lambda h: [])


def test_every_gpu_with_everything_nvml_tells(full_device: None) -> None:
    first, second = gpu.gpu_readings({4242, 4243})
    assert first == gpu.GpuReading(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        memory_total=80 << 30,
        memory_used=30 << 30,  # v2: without the reserved GiB
        utilization_pct=87,
        temperature_c=64,
        power_w=301.5,
        power_limit_w=450.0,
        process_memory=None,  # none of ours on GPU 0
    )
    assert second.index == 1
    assert second.process_memory == 3 << 30


def test_a_driver_without_the_v2_memory_call_falls_back_to_v1(
    monkeypatch: pytest.MonkeyPatch, full_device: None
) -> None:
    v1 = pynvml.nvmlDeviceGetMemoryInfo

    def old_driver(handle: str, version: int | None = None) -> SimpleNamespace:
        if version is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return v1(handle)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", old_driver)
    assert gpu.gpu_readings()[0].memory_used == 31 << 30
    assert gpu.gpu_memory() == gpu.GpuMemory(total=80 << 30, used=31 << 30, free=49 << 30)


def test_nvml_raising_on_every_call_reads_as_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml_raising_everywhere(monkeypatch)
    assert gpu.gpu_readings({1}) == []
    assert gpu.gpu_memory() is None
    assert gpu.gpu_name() is None
    assert gpu.gpu_compute_capability() is None


def test_nvml_up_but_every_device_call_raising_gives_empty_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml_raising_everywhere(monkeypatch, except_init=True)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    assert gpu.gpu_readings({1}) == [gpu.GpuReading(index=0)]
