"""The drop folder: which adapter versions are accepted, and why the others are refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from appliance import demo
from appliance.adapters.drops import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterLimits,
    BaseModelInfo,
    inspect,
    register_version,
    scan,
)
from appliance.adapters.safetensors_header import read_header
from appliance.errors import AdapterError
from appliance.tenancy.store import Store

TENANTS = {t.name: t for t in demo.DEMO_TENANTS}


def register_all(store: Store, root: Path, base: BaseModelInfo, limits: AdapterLimits) -> list[str]:
    """What the daemon does for every folder at start-up; returns the labels registered."""
    registered = (register_version(store, t, v, folder, base, limits, root) for t, v, folder in scan(root))
    return [adapter.label for adapter in registered if adapter is not None]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base model and one pristine adapter per demo tenant, built once for the module."""
    root = tmp_path_factory.mktemp("drops-built")
    demo.build_model(root / "model")
    for tenant in demo.DEMO_TENANTS:
        demo.build_adapter(root / "model", tenant, root / "pristine" / tenant.name)
    return root


@pytest.fixture(scope="module")
def base(built: Path) -> BaseModelInfo:
    return BaseModelInfo.from_model_dir(built / "model")


@pytest.fixture
def store() -> Iterator[Store]:
    store = Store.connect(":memory:")
    yield store
    store.db.close()


class Drop:
    """An adapters directory for one test, filled from the pristine demo adapters."""

    def __init__(self, root: Path, pristine: Path, base: BaseModelInfo):
        self.root, self.pristine, self.base = root, pristine, base

    def put(self, tenant: str = "acme", version: str = "v1", source: str = "acme") -> Path:
        folder = self.root / tenant / version
        shutil.copytree(self.pristine / source, folder)
        return folder

    def inspect(self, tenant: str = "acme", version: str = "v1", limits: AdapterLimits | None = None) -> Any:
        folder = self.root / tenant / version
        return inspect(tenant, version, folder, self.base, limits or AdapterLimits(), self.root)

    def refusal(self, tenant: str = "acme", version: str = "v1", limits: AdapterLimits | None = None) -> str:
        with pytest.raises(AdapterError) as caught:
            self.inspect(tenant, version, limits)
        return str(caught.value)

    def register(self, store: Store) -> list[str]:
        return register_all(store, self.root, self.base, AdapterLimits())


@pytest.fixture
def drop(tmp_path: Path, built: Path, base: BaseModelInfo) -> Drop:
    root = tmp_path / "adapters"
    root.mkdir()
    return Drop(root, built / "pristine", base)


def state_of(store: Store, tenant: str, version: str) -> str | None:
    found = store.get_adapter(tenant, version)
    return found.state if found else None


def active_version(store: Store, tenant: str) -> str | None:
    active = store.active_adapter(tenant)
    return active.version if active else None


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | changes))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def header_length(path: Path) -> int:
    return int(struct.unpack("<Q", path.read_bytes()[:8])[0])


def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# -- the base model -----------------------------------------------------------------------------


def test_base_model_linear_shapes(base: BaseModelInfo) -> None:
    shape = demo.MODEL_SHAPE
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    assert base.linear_shapes["model.layers.0.self_attn.q_proj"] == (hidden, hidden)
    assert base.linear_shapes["model.layers.1.mlp.gate_proj"] == (inter, hidden)
    assert base.linear_shapes["model.layers.1.mlp.down_proj"] == (hidden, inter)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= base.module_names
    assert not any("embed" in name for name in base.linear_shapes)
    assert not any("norm" in name for name in base.linear_shapes)


# -- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TENANTS))
def test_valid_adapter_accepted(drop: Drop, name: str) -> None:
    folder = drop.put(name, "v1", source=name)
    tenant = TENANTS[name]
    found = drop.inspect(name, "v1")
    weights = (folder / WEIGHTS_FILE).read_bytes()
    expected_sha = hashlib.sha256((folder / CONFIG_FILE).read_bytes() + weights).hexdigest()
    assert (found.tenant, found.version, found.state, found.reason) == (name, "v1", "ready", "")
    assert found.rank == tenant.rank
    assert found.alpha == float(tenant.alpha)
    assert found.target_modules == tuple(sorted(tenant.target_modules))
    assert found.size_bytes == len(weights)
    assert found.sha256 == expected_sha
    assert found.path == str(folder.resolve())


def test_sha256_changes_with_the_config(drop: Drop) -> None:
    folder = drop.put()
    before = drop.inspect().sha256
    edit_config(folder, lora_alpha=32)
    after = drop.inspect()
    assert after.sha256 != before
    assert after.alpha == 32.0


def test_alpha_defaults_to_rank(drop: Drop) -> None:
    folder = drop.put()
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["lora_alpha"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    assert drop.inspect().alpha == float(TENANTS["acme"].rank)


def test_link_that_stays_inside_is_accepted(drop: Drop) -> None:
    drop.put("acme", "v1")
    folder = drop.put("acme", "v2")
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).symlink_to(drop.root / "acme" / "v1" / WEIGHTS_FILE)
    assert drop.inspect("acme", "v2").state == "ready"


# -- refused: incomplete or malformed files -----------------------------------------------------


CUTS: dict[str, Callable[[int, int], int]] = {
    "empty": lambda header, total: 0,
    "inside-prefix": lambda header, total: 5,
    "prefix-only": lambda header, total: 8,
    "inside-header": lambda header, total: 8 + header // 2,
    "header-minus-one": lambda header, total: 8 + header - 1,
    "header-only": lambda header, total: 8 + header,
    "inside-data": lambda header, total: (8 + header + total) // 2,
    "last-byte-missing": lambda header, total: total - 1,
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_truncated_weights_refused(drop: Drop, cut: str) -> None:
    weights = drop.put() / WEIGHTS_FILE
    blob = weights.read_bytes()
    at = CUTS[cut](header_length(weights), len(blob))
    assert 0 <= at < len(blob)
    weights.write_bytes(blob[:at])
    assert "incomplete" in drop.refusal()


def test_trailing_garbage_refused(drop: Drop) -> None:
    weights = drop.put() / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes() + b"\0garbage")
    assert "8 unexpected trailing bytes" in drop.refusal()


def test_not_a_safetensors_file_refused(drop: Drop) -> None:
    weights = drop.put() / WEIGHTS_FILE
    weights.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe[]")
    assert "not a safetensors file" in drop.refusal()


def test_huge_declared_header_refused_without_reading_it(drop: Drop) -> None:
    weights = drop.put() / WEIGHTS_FILE
    weights.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    assert "header too large" in drop.refusal()


class _Trap:
    """Unpickling this creates `marker`: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def write_trap(path: Path, marker: Path) -> None:
    torch.save({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2), "x": _Trap(marker)}, path)


def test_trap_pickle_fires_when_loaded(tmp_path: Path) -> None:
    """The pickle used below really runs code when loaded, so its absence of effect means something."""
    marker = tmp_path / "loaded"
    write_trap(tmp_path / "trap.bin", marker)
    loaded = torch.load(tmp_path / "trap.bin", weights_only=False)  # our own file
    loaded["x"].close()
    assert marker.exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.pkl"])
def test_pickle_weights_refused_and_never_loaded(drop: Drop, store: Store, tmp_path: Path, name: str) -> None:
    folder = drop.put()
    (folder / WEIGHTS_FILE).unlink()
    marker = tmp_path / "unpickled"
    write_trap(folder / name, marker)
    assert "pickle weights" in drop.refusal()
    assert name in drop.refusal()
    drop.register(store)
    refused = store.get_adapter("acme", "v1")
    assert refused is not None
    assert refused.state == "refused"
    assert "pickle" in refused.reason
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored(drop: Drop, tmp_path: Path) -> None:
    folder = drop.put()
    marker = tmp_path / "unpickled"
    write_trap(folder / "adapter_model.bin", marker)
    assert drop.inspect().state == "ready"
    assert not marker.exists()


def test_missing_files_refused(drop: Drop) -> None:
    folder = drop.put()
    (folder / CONFIG_FILE).unlink()
    assert drop.refusal() == f"missing {CONFIG_FILE}"
    (folder / WEIGHTS_FILE).unlink()
    assert drop.refusal() == f"missing {WEIGHTS_FILE}"


def test_weights_over_the_size_limit_refused(drop: Drop) -> None:
    drop.put()
    assert "the limit is 100" in drop.refusal(limits=AdapterLimits(max_bytes=100))


# -- refused: the config ------------------------------------------------------------------------


def test_rank_above_the_engine_limit_refused(drop: Drop) -> None:
    drop.put()
    assert "exceeds the engine's max_lora_rank 4" in drop.refusal(limits=AdapterLimits(max_rank=4))
    assert drop.inspect(limits=AdapterLimits(max_rank=8)).rank == 8


CONFIG_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"peft_type": "LOHA"}, "peft_type must be LORA"),
    ({"peft_type": None}, "peft_type must be LORA"),
    ({"r": 128}, "exceeds the engine's max_lora_rank"),
    ({"r": 0}, "rank r must be a positive integer"),
    ({"r": "8"}, "rank r must be a positive integer"),
    ({"r": 8.0}, "rank r must be a positive integer"),
    ({"r": True}, "rank r must be a positive integer"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
    ({"lora_alpha": True}, "lora_alpha must be a finite number"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias must be 'none'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": "q_proj|v_proj"}, "target_modules must be a non-empty list"),
    ({"target_modules": []}, "target_modules must be a non-empty list"),
    ({"target_modules": ["q_proj", "v_proj", "qkv_proj"]}, "not in the base model: qkv_proj"),
    ({"r": 4}, "has shape [8, 128], expected [4, 128]"),  # config and tensors disagree
]


@pytest.mark.parametrize(
    ("changes", "reason"), CONFIG_REFUSALS, ids=[json.dumps(c) for c, _ in CONFIG_REFUSALS]
)
def test_config_refused(drop: Drop, changes: dict[str, Any], reason: str) -> None:
    edit_config(drop.put(), **changes)
    assert reason in drop.refusal()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
def test_invalid_config_json_refused(drop: Drop, content: bytes, reason: str) -> None:
    (drop.put() / CONFIG_FILE).write_bytes(content)
    assert reason in drop.refusal()


def test_deeply_nested_config_refused(drop: Drop, store: Store) -> None:
    (drop.put() / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    drop.register(store)
    assert state_of(store, "acme", "v1") == "refused"


@pytest.mark.parametrize("alpha", ["NaN", "Infinity"])
def test_non_finite_alpha_refused(drop: Drop, alpha: str) -> None:
    path = drop.put() / CONFIG_FILE
    path.write_text(path.read_text().replace('"lora_alpha": 16,', f'"lora_alpha": {alpha},'))
    assert f'"lora_alpha": {alpha},' in path.read_text()
    assert "lora_alpha" in drop.refusal()


# -- refused: the tensors -----------------------------------------------------------------------

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def test_wrong_tensor_shape_refused(drop: Drop) -> None:
    def grow(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.lora_A.weight"] = torch.zeros(8, 64)

    edit_tensors(drop.put(), grow)
    assert f"'{Q_PROJ}.lora_A.weight' has shape [8, 64], expected [8, 128]" in drop.refusal()


def test_unpaired_lora_a_refused(drop: Drop) -> None:
    edit_tensors(drop.put(), lambda tensors: tensors.pop(f"{Q_PROJ}.lora_B.weight"))
    assert "pairs incomplete for model.layers.0.self_attn.q_proj" in drop.refusal()


def test_tensor_for_a_layer_the_base_lacks_refused(drop: Drop) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 128)

    edit_tensors(drop.put(), add)
    assert "targets a layer the base model does not have" in drop.refusal()


def test_unexpected_tensor_kind_refused(drop: Drop) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.lora_magnitude_vector"] = torch.zeros(128)

    edit_tensors(drop.put(), add)
    assert "unexpected tensor" in drop.refusal()


def test_no_tensors_refused(drop: Drop) -> None:
    save_file({}, drop.put() / WEIGHTS_FILE)
    assert "holds no tensors" in drop.refusal()


# -- the safetensors header reader --------------------------------------------------------------


def test_read_header_of_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, path, metadata={"k": "v"})
    infos = read_header(path)
    assert set(infos) == {"a", "b"}
    assert (infos["a"].dtype, infos["a"].shape, infos["a"].nbytes) == ("F32", (2, 3), 24)
    assert (infos["b"].dtype, infos["b"].shape, infos["b"].nbytes) == ("F16", (4,), 8)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "inconsistent offsets"),
        ({"dtype": "F32", "shape": [2]}, "malformed entry"),
        ({"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}, "malformed entry"),
        ({"dtype": "F32", "shape": ["two"], "data_offsets": [0, 8]}, "malformed entry"),
        ({"dtype": "F32", "shape": [2], "data_offsets": 8}, "malformed entry"),
        ("not an object", "malformed entry"),
    ],
)
def test_malformed_header_entries_refused(tmp_path: Path, entry: Any, reason: str) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"t": entry}, b"\0" * 8)
    with pytest.raises(AdapterError, match=reason):
        read_header(path)


def test_non_integer_offsets_refused_without_crashing(drop: Drop, store: Store) -> None:
    weights = drop.put() / WEIGHTS_FILE
    write_safetensors(weights, {"t": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4)
    assert drop.register(store) == ["acme@v1"]
    assert state_of(store, "acme", "v1") == "refused"


@pytest.mark.parametrize(
    ("header", "data_len"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            8,
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16),
    ],
    ids=["overlap", "gap"],
)
def test_overlapping_or_gapped_offsets_refused(tmp_path: Path, header: dict[str, Any], data_len: int) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, header, b"\0" * data_len)
    with pytest.raises(SafetensorError, match="invalid offset"), safe_open(path, "pt"):
        pass
    with pytest.raises(AdapterError):
        read_header(path)


# -- links and names ----------------------------------------------------------------------------


def test_version_folder_linked_outside_refused(drop: Drop, store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "v2"
    shutil.copytree(drop.pristine / "acme", outside)
    (drop.root / "acme").mkdir()
    (drop.root / "acme" / "v2").symlink_to(outside, target_is_directory=True)
    assert "leaves the adapters directory" in drop.refusal("acme", "v2")
    assert drop.register(store) == ["acme@v2"]
    refused = store.get_adapter("acme", "v2")
    assert refused is not None
    assert refused.state == "refused"
    assert "leaves the adapters directory" in refused.reason


def test_tenant_folder_linked_outside_refused(drop: Drop, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(drop.pristine / "acme", outside / "v1")
    (drop.root / "acme").symlink_to(outside, target_is_directory=True)
    assert "leaves the adapters directory" in drop.refusal("acme", "v1")


@pytest.mark.parametrize("linked", [WEIGHTS_FILE, CONFIG_FILE])
def test_file_linked_outside_refused(drop: Drop, tmp_path: Path, linked: str) -> None:
    folder = drop.put()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(folder / linked, outside / linked)
    (folder / linked).symlink_to(outside / linked)
    assert drop.refusal() == f"{linked} is a link that leaves the adapters directory or its tenant's folder"


@pytest.mark.parametrize(
    ("tenant", "version", "reason"),
    [
        ("Bad Name", "v1", "invalid tenant folder name"),
        ("ACME", "v1", "invalid tenant folder name"),
        ("café", "v1", "invalid tenant folder name"),
        ("-acme", "v1", "invalid tenant folder name"),
        ("acme", "v 1", "invalid version folder name"),
        ("acme", "vé", "invalid version folder name"),
        ("acme", "-v1", "invalid version folder name"),
    ],
)
def test_bad_folder_names_refused_with_an_event(
    drop: Drop, store: Store, tenant: str, version: str, reason: str
) -> None:
    drop.put("globex", "v1", source="globex")
    drop.put(tenant, version)
    assert reason in drop.refusal(tenant, version)
    assert drop.register(store) == ["globex@v1"]
    assert [(a.tenant, a.version) for a in store.adapters()] == [("globex", "v1")]
    (event,) = [e for e in store.events() if e["kind"] == "adapter_refused"]
    assert (event["tenant"], event["version"]) == (tenant, version)
    assert reason in event["detail"]


def test_scan_skips_copies_in_progress(drop: Drop) -> None:
    drop.put("acme", "v1")
    for tenant, version in [
        ("acme", ".v2"),
        ("acme", "v3.tmp"),
        ("acme", "v4.partial"),
        (".trash", "v1"),
        ("globex.partial", "v1"),
    ]:
        drop.put(tenant, version)
    (drop.root / "acme" / "notes.txt").write_text("not a version")
    (drop.root / "README").write_text("not a tenant")
    found = [(tenant, version) for tenant, version, _ in scan(drop.root)]
    assert found == [("acme", "v1")]


def test_scan_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert list(scan(tmp_path / "nope")) == []


# -- register_all -------------------------------------------------------------------------------


def test_register_all_keeps_the_last_good_version_active(drop: Drop, store: Store) -> None:
    drop.put("acme", "v1")
    truncated = drop.put("acme", "v2") / WEIGHTS_FILE
    truncated.write_bytes(truncated.read_bytes()[:-10])
    pickled = drop.put("acme", "v10")
    (pickled / WEIGHTS_FILE).unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "adapter_model.bin")
    drop.put("globex", "v1", source="globex")

    assert drop.register(store) == ["acme@v1", "acme@v10", "acme@v2", "globex@v1"]
    states = {a.label: (a.state, a.reason) for a in store.adapters()}
    assert states["acme@v1"] == ("ready", "")
    assert states["acme@v2"][0] == "refused"
    assert "incomplete" in states["acme@v2"][1]
    assert states["acme@v10"][0] == "refused"
    assert "pickle" in states["acme@v10"][1]
    assert active_version(store, "acme") == "v1"
    assert active_version(store, "globex") == "v1"
    kinds = sorted(e["kind"] for e in store.events())
    assert kinds == ["adapter_refused", "adapter_refused", "adapter_registered", "adapter_registered"]


def test_register_all_is_quiet_when_nothing_changed(drop: Drop, store: Store) -> None:
    drop.put("acme", "v1")
    broken = drop.put("acme", "v2")
    edit_config(broken, peft_type="IA3")
    drop.register(store)
    events = store.events()
    assert drop.register(store) == ["acme@v1", "acme@v2"]
    assert store.events() == events


def test_register_all_picks_up_a_fixed_version(drop: Drop, store: Store) -> None:
    drop.put("acme", "v1")
    folder = drop.put("acme", "v2")
    weights = folder / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    drop.register(store)
    assert active_version(store, "acme") == "v1"
    weights.write_bytes(good)  # the copy finished
    drop.register(store)
    active = store.active_adapter("acme")
    assert active is not None
    assert (active.version, active.state, active.reason) == ("v2", "ready", "")
