"""Residency planning (slot size, engine sizes from a budget) and the GPU/CPU/disk report."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from appliance.adapters.drops import BaseModelInfo
from appliance.adapters.residency import (
    Plan,
    ResidencyTracker,
    adapter_bytes_from_header,
    lora_budget_bytes,
    plan,
    slot_bytes,
)

MiB = 1 << 20

# Two decoder layers of a small GQA model, plus an untied lm_head that must not count.
LAYER = {
    "self_attn.q_proj": (256, 256),
    "self_attn.k_proj": (64, 256),
    "self_attn.v_proj": (64, 256),
    "self_attn.o_proj": (256, 256),
    "mlp.gate_proj": (512, 256),
    "mlp.up_proj": (512, 256),
    "mlp.down_proj": (256, 512),
}
BASE = BaseModelInfo(
    {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in LAYER.items()}
    | {"lm_head": (32000, 256)}
)
# Per layer, in + out: q 512, k 320, v 320, o 512, gate 768, up 768, down 768 = 3968.
SLOT_R16_BF16 = 2 * 3968 * 16 * 2  # layers * (in + out) * rank * bytes = 253952


def _plan(**overrides: object) -> Plan:
    args: dict[str, object] = {
        "adapters": 3,
        "pinned": 0,
        "base": BASE,
        "max_rank": 16,
        "dtype_bytes": 2,
        "lora_budget_bytes": 512 * MiB,
        "configured_max_loras": None,
        "configured_max_cpu_loras": None,
    }
    return plan(**(args | overrides))  # type: ignore[arg-type]


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A valid safetensors file of zeros: name → (dtype, shape)."""
    sizes = {"BF16": 2, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = sizes[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


# --- sizes -----------------------------------------------------------------------------------


def test_slot_bytes_by_hand() -> None:
    assert slot_bytes(BASE, 16, 2) == SLOT_R16_BF16 == 253952
    assert slot_bytes(BASE, 8, 4) == SLOT_R16_BF16  # half the rank, twice the bytes per element
    assert slot_bytes(BaseModelInfo({"lm_head": (100, 10)}), 64, 2) == 0
    assert slot_bytes(BaseModelInfo({"a.proj": (3, 5)}), 2, 2) == 2 * (3 + 5) * 2


def test_adapter_bytes_from_header(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    _write_safetensors(path, {"x.lora_A.weight": ("BF16", (8, 256)), "x.lora_B.weight": ("F32", (64, 8))})
    assert adapter_bytes_from_header(path) == 8 * 256 * 2 + 64 * 8 * 4
    assert adapter_bytes_from_header(str(path)) == 8 * 256 * 2 + 64 * 8 * 4


def test_full_rank_adapter_on_every_layer_is_exactly_one_slot(tmp_path: Path) -> None:
    """A slot holds the largest adapter the engine accepts: max rank on every linear layer."""
    tensors = {}
    for module, (out_features, in_features) in BASE.linear_shapes.items():
        if module != "lm_head":
            stem = f"base_model.model.{module}"
            tensors[f"{stem}.lora_A.weight"] = ("BF16", (16, in_features))
            tensors[f"{stem}.lora_B.weight"] = ("BF16", (out_features, 16))
    path = tmp_path / "full.safetensors"
    _write_safetensors(path, tensors)
    assert adapter_bytes_from_header(path) == slot_bytes(BASE, 16, 2)


def test_lora_budget_bytes() -> None:
    assert lora_budget_bytes(gpu_free_bytes=None, cpu_budget_bytes=256 * MiB) == 256 * MiB
    assert lora_budget_bytes(gpu_free_bytes=10 * MiB, cpu_budget_bytes=256 * MiB) == 5 * MiB
    assert lora_budget_bytes(gpu_free_bytes=10 * MiB, cpu_budget_bytes=0, fraction=0.25) == 10 * MiB // 4
    assert lora_budget_bytes(gpu_free_bytes=-MiB, cpu_budget_bytes=256 * MiB) == 0


# --- plan ------------------------------------------------------------------------------------


def test_few_adapters_within_budget_get_one_slot_each() -> None:
    p = _plan(adapters=3)
    assert (p.max_loras, p.max_cpu_loras) == (3, 3 + 16)
    assert (p.slot_bytes, p.lora_budget_bytes) == (SLOT_R16_BF16, 512 * MiB)
    assert "3 adapters" in p.reason
    assert "→ 3 GPU slots" in p.reason
    assert "budget" in p.reason
    assert "over" not in p.reason


def test_small_budget_gives_fewer_slots_and_says_so() -> None:
    p = _plan(adapters=24, lora_budget_bytes=5 * SLOT_R16_BF16 + 1)
    assert p.max_loras == 5
    assert p.max_cpu_loras == 24 + 16
    assert "budget fits 5 of 24 wanted" in p.reason


def test_budget_below_one_slot_still_gives_the_floor() -> None:
    p = _plan(adapters=4, lora_budget_bytes=SLOT_R16_BF16 - 1)
    assert p.max_loras == 1
    assert "over the budget" in p.reason


def test_zero_adapters_gives_the_floor() -> None:
    assert _plan(adapters=0).max_loras == 1
    assert _plan(adapters=0, floor_loras=4).max_loras == 4
    assert _plan(adapters=0).max_cpu_loras == 16


def test_cap_limits_slots_even_with_room() -> None:
    p = _plan(adapters=1000, lora_budget_bytes=1 << 40, cap_loras=256)
    assert p.max_loras == 256
    assert p.max_cpu_loras == 1016


def test_pinned_adapters_keep_a_slot_free_for_the_others() -> None:
    p = _plan(adapters=10, pinned=4, lora_budget_bytes=2 * SLOT_R16_BF16)
    assert p.max_loras == 5
    assert "4 pinned" in p.reason
    assert "over the budget" in p.reason
    assert _plan(adapters=4, pinned=4, lora_budget_bytes=2 * SLOT_R16_BF16).max_loras == 5


def test_configured_values_win() -> None:
    p = _plan(adapters=24, configured_max_loras=8, configured_max_cpu_loras=64)
    assert (p.max_loras, p.max_cpu_loras) == (8, 64)
    assert "configured" in p.reason
    assert "over" not in p.reason
    tight = _plan(adapters=24, lora_budget_bytes=2 * SLOT_R16_BF16, configured_max_loras=8)
    assert tight.max_loras == 8
    assert "over the budget" in tight.reason
    assert _plan(adapters=200, configured_max_cpu_loras=30).max_cpu_loras == 30


def test_configured_cpu_cache_bounds_automatic_slots() -> None:
    p = _plan(adapters=24, configured_max_cpu_loras=4)
    assert (p.max_loras, p.max_cpu_loras) == (4, 4)


def test_configured_cpu_cache_below_configured_slots_is_raised() -> None:
    p = _plan(adapters=24, configured_max_loras=8, configured_max_cpu_loras=4)
    assert (p.max_loras, p.max_cpu_loras) == (8, 8)
    assert "raised to max_loras" in p.reason


def test_cpu_cache_never_smaller_than_gpu_slots() -> None:
    rng = random.Random(7)  # noqa: S311
    for _ in range(2000):
        adapters = rng.randrange(0, 400)
        p = _plan(
            adapters=adapters,
            pinned=rng.randrange(0, adapters + 1),
            max_rank=rng.choice([8, 16, 64]),
            lora_budget_bytes=rng.randrange(0, 200 * SLOT_R16_BF16),
            configured_max_loras=rng.choice([None, None, rng.randrange(1, 64)]),
            configured_max_cpu_loras=rng.choice([None, None, rng.randrange(1, 128)]),
            floor_loras=rng.randrange(1, 4),
        )
        assert 1 <= p.max_loras <= p.max_cpu_loras, p
        assert "\n" not in p.reason


# --- tracker ---------------------------------------------------------------------------------


def _tiers(tracker: ResidencyTracker, names: list[str]) -> dict[str, list[str]]:
    tiers: dict[str, list[str]] = {"gpu": [], "cpu": [], "disk": []}
    for entry in tracker.report(names):
        tiers[entry.tier].append(entry.name)
    return tiers


def test_gpu_tier_holds_the_most_recently_used() -> None:
    tracker = ResidencyTracker(max_loras=2, max_cpu_loras=4)
    for t, name in enumerate(["a", "b", "c"]):
        tracker.used(name, float(t))
    assert _tiers(tracker, ["a", "b", "c", "d"]) == {"gpu": ["b", "c"], "cpu": ["a"], "disk": ["d"]}
    tracker.used("a", 10.0)
    assert _tiers(tracker, ["a", "b", "c", "d"]) == {"gpu": ["a", "c"], "cpu": ["b"], "disk": ["d"]}
    report = {r.name: r for r in tracker.report(["a", "d"])}
    assert report["a"].last_used == 10.0
    assert report["d"].last_used is None


def test_warm_load_takes_a_slot_like_vllm_add_lora() -> None:
    tracker = ResidencyTracker(max_loras=1, max_cpu_loras=3)
    tracker.used("a", 1.0)
    tracker.loaded("b")
    assert _tiers(tracker, ["a", "b"]) == {"gpu": ["b"], "cpu": ["a"], "disk": []}
    assert tracker.report(["b"])[0].last_used is None


def test_full_cpu_cache_evicts_least_recently_used_to_disk() -> None:
    tracker = ResidencyTracker(max_loras=1, max_cpu_loras=2)
    tracker.loaded("a")
    tracker.loaded("b")
    tracker.used("a", 1.0)  # a is now more recent than b
    tracker.loaded("c")
    assert _tiers(tracker, ["a", "b", "c"]) == {"gpu": ["c"], "cpu": ["a"], "disk": ["b"]}


def test_pinned_is_never_evicted() -> None:
    tracker = ResidencyTracker(max_loras=2, max_cpu_loras=3)
    tracker.pin("p")
    for t in range(50):
        tracker.used(f"x{t}", float(t))
    report = {r.name: r for r in tracker.report(["p", "x48", "x49"])}
    assert report["p"].tier == "gpu"
    assert report["p"].pinned
    assert (report["x49"].tier, report["x48"].tier) == ("gpu", "cpu")


def test_all_slots_pinned_leaves_another_adapter_in_host_memory() -> None:
    """Every slot pinned happens for a moment during a pinned tenant's version switch; the engine
    holds other adapters' requests back meanwhile (engines/slots.py), so they get no slot."""
    tracker = ResidencyTracker(max_loras=2, max_cpu_loras=4)
    tracker.pin("p1")
    tracker.pin("p2")
    tracker.used("x", 1.0)
    assert _tiers(tracker, ["p1", "p2", "x"]) == {"gpu": ["p1", "p2"], "cpu": ["x"], "disk": []}
    tracker.unloaded("p2")
    tracker.used("x", 2.0)
    assert _tiers(tracker, ["p1", "p2", "x"]) == {"gpu": ["p1", "x"], "cpu": [], "disk": ["p2"]}


def test_unpin_and_unload() -> None:
    tracker = ResidencyTracker(max_loras=1, max_cpu_loras=1)
    tracker.pin("p")
    tracker.unpin("p")
    tracker.used("x", 1.0)
    assert _tiers(tracker, ["p", "x"]) == {"gpu": ["x"], "cpu": [], "disk": ["p"]}
    tracker.pin("x")
    tracker.unloaded("x")
    assert tracker.report(["x"])[0].tier == "disk"
    assert not tracker.report(["x"])[0].pinned
    tracker.used("p", 2.0)  # the pin went with the removal: x no longer holds the only slot
    assert tracker.report(["p"])[0].tier == "gpu"


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_cpu_loras"):
        ResidencyTracker(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="max_loras"):
        ResidencyTracker(max_loras=0, max_cpu_loras=2)


def test_report_lists_every_known_name_once() -> None:
    tracker = ResidencyTracker(max_loras=1, max_cpu_loras=2)
    tracker.used("a", 1.0)
    tracker.used("gone", 2.0)
    report = tracker.report(["b", "a", "b", "c"])
    assert [r.name for r in report] == ["b", "a", "c"]
    assert [r.tier for r in report] == ["disk", "cpu", "disk"]


def test_random_events_match_the_lru_rule_and_keep_counts_consistent() -> None:
    """Without pins, the GPU tier is the most recently touched loaded adapters: all max_loras of them
    until a removal frees a slot, which stays empty until the next load or use (as in vLLM)."""
    rng = random.Random(11)  # noqa: S311
    names = [f"t{i}" for i in range(30)]
    for max_loras, max_cpu_loras in [(1, 1), (2, 5), (4, 4), (8, 16)]:
        tracker = ResidencyTracker(max_loras, max_cpu_loras)
        order: list[str] = []  # reference: loaded adapters, least recent first
        for t in range(600):
            name, event = rng.choice(names), rng.random()
            removals = t >= 300
            if removals and event < 0.1:
                tracker.unloaded(name)
                order = [n for n in order if n != name]
            else:
                if event < 0.3:
                    tracker.loaded(name)
                else:
                    tracker.used(name, float(t))
                order = ([n for n in order if n != name] + [name])[-max_cpu_loras:]
            tiers = _tiers(tracker, names)
            gpu = len(tiers["gpu"])
            if not removals:
                assert gpu == min(max_loras, len(order))
            assert gpu <= max_loras
            assert set(tiers["gpu"]) == set(order[len(order) - gpu :])
            assert set(tiers["cpu"]) == set(order[: len(order) - gpu])
            assert gpu + len(tiers["cpu"]) <= max_cpu_loras
            assert sorted(tiers["gpu"] + tiers["cpu"] + tiers["disk"]) == sorted(names)


def test_random_events_with_pins_keep_counts_consistent() -> None:
    rng = random.Random(5)  # noqa: S311
    names = [f"t{i}" for i in range(40)]
    tracker = ResidencyTracker(max_loras=4, max_cpu_loras=10)
    pinned: set[str] = set()
    for t in range(2000):
        name, event = rng.choice(names), rng.random()
        if event < 0.05 and len(pinned) < 3:
            tracker.pin(name)
            pinned.add(name)
        elif event < 0.1:
            tracker.unpin(name)
            pinned.discard(name)
        elif event < 0.15:
            tracker.unloaded(name)
            pinned.discard(name)
        else:
            tracker.used(name, float(t))
        report = tracker.report(names)
        tiers = [r.tier for r in report]
        assert tiers.count("gpu") <= 4
        assert tiers.count("gpu") + tiers.count("cpu") <= 10
        assert [r.name for r in report] == names
        assert {r.name for r in report if r.pinned} == pinned
        assert all(r.tier == "gpu" for r in report if r.pinned)


def test_two_hundred_adapters_on_eight_slots_and_sixty_four_in_memory() -> None:
    p = _plan(adapters=200, configured_max_loras=8, configured_max_cpu_loras=64)
    tracker = ResidencyTracker(p.max_loras, p.max_cpu_loras)
    names = [f"tenant{i:03d}/v1" for i in range(200)]
    for name in names:  # warm start: vLLM keeps the last 64 added
        tracker.loaded(name)
    tiers = _tiers(tracker, names)
    assert tiers["gpu"] == names[-8:]
    assert tiers["cpu"] == names[-64:-8]
    assert len(tiers["disk"]) == 136
    hot = names[:10]  # then traffic concentrates on ten tenants that had fallen to disk
    rng = random.Random(3)  # noqa: S311
    for t in range(1000):
        tracker.used(rng.choice(hot), float(t))
    tiers = _tiers(tracker, names)
    assert len(tiers["gpu"]) == 8
    assert set(tiers["gpu"]) <= set(hot)
    assert set(hot) <= set(tiers["gpu"] + tiers["cpu"])
    assert (len(tiers["cpu"]), len(tiers["disk"])) == (56, 136)
    used = [r for r in tracker.report(names) if r.last_used is not None]
    assert {r.name for r in used} == set(hot)
