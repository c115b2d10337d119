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
