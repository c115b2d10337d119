"""The drop folder: which adapter versions are accepted, and why the others are refused."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from appliance.adapters import drops, peftconfig, registry
from appliance.adapters.drops import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterLimits,
    BaseModelInfo,
    inspect,
    judge,
    tenant_folders,
    version_folders,
)
from appliance.adapters.pacing import Pacer
from appliance.adapters.registry import FolderRegistry
from appliance.adapters.safetensors_header import MAX_ADAPTER_HEADER_BYTES, read_header
from appliance.demo import build as demo
from appliance.errors import AdapterError
from appliance.tenancy.store import AdapterVersion, Route, Store
from tests.conftest import bounded, tmpfs_dir

TENANTS = {t.name: t for t in demo.DEMO_TENANTS}


def register_all(registry: FolderRegistry, store: Store) -> list[str]:
    """What the daemon does for every tenant folder at start-up; returns the labels registered."""
    for tenant in tenant_folders(registry.adapters_dir):
        registry.reconcile(store, tenant)
    return [adapter.label for adapter in store.adapters()]


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
    return BaseModelInfo.from_model_dir(built / "model").named(demo.DEMO_MODEL_NAME)


@pytest.fixture
def store() -> Iterator[Store]:
    """In memory; usable from the thread `bounded` runs a registration on (one at a time)."""
    store = Store(sqlite_utils.Database(sqlite3.connect(":memory:", check_same_thread=False)))
    yield store
    store.db.close()


class Drop:
    """An adapters directory for one test, filled from the pristine demo adapters."""

    def __init__(self, root: Path, pristine: Path, base: BaseModelInfo):
        self.root, self.pristine, self.base = root, pristine, base
        self.registry = FolderRegistry(root, base, AdapterLimits())

    def put(self, tenant: str = "acme", version: str = "v1", source: str = "acme") -> Path:
        folder = self.root / tenant / version
        shutil.copytree(self.pristine / source, folder)
        return folder

    def inspect(self, tenant: str = "acme", version: str = "v1", limits: AdapterLimits | None = None) -> Any:
        return inspect(tenant, version, self.root, self.base, limits or AdapterLimits())

    def refusal(self, tenant: str = "acme", version: str = "v1", limits: AdapterLimits | None = None) -> str:
        with pytest.raises(AdapterError) as caught:
            self.inspect(tenant, version, limits)
        return str(caught.value)

    def register(self, store: Store) -> list[str]:
        return register_all(self.registry, store)


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
    ({"bias": "all"}, "bias='all' is refused by this engine"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": "q_proj|v_proj"}, "selects no module of the base model"),  # a regex, fully matched
    ({"target_modules": []}, "selects no module of the base model"),
    ({"target_modules": ["qkv_proj"]}, "selects no module of the base model"),
    ({"target_modules": ["q_proj"]}, "adapts model.layers.0.self_attn.v_proj, which target_modules does not"),
    (
        {"target_modules": ["q_proj", "v_proj", "k_proj"]},
        "selects model.layers.0.self_attn.k_proj and 1 more, but",
    ),
    ({"target_modules": None}, "target_modules is missing"),
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


@pytest.mark.parametrize(
    ("name", "shape", "reason"),
    [
        (f"{Q_PROJ}.lora_C.weight", (8, 128), "unexpected tensor"),
        (f"{Q_PROJ}.lora_magnitude_vector", (128,), "DoRA's magnitude (use_dora=true)"),
        (f"{Q_PROJ}.lora_B.bias", (128,), "a bias on lora_B (lora_bias=true)"),
        (f"{Q_PROJ}.bias", (128,), "a trained bias of the base layer (bias='none')"),
        ("base_model.model.lm_head.weight", (640, 128), "save_embedding_layers=False"),
        ("base_model.model.model.embed_tokens.base_layer.weight", (700, 128), "vocabulary was resized"),
    ],
    ids=["unknown", "dora", "lora-bias", "bias", "embedding-copy", "resized-vocabulary"],
)
def test_extra_tensors_are_refused_naming_the_training_option(
    drop: Drop, name: str, shape: tuple[int, ...], reason: str
) -> None:
    edit_tensors(drop.put(), lambda tensors: tensors.__setitem__(name, torch.zeros(shape)))
    assert reason in drop.refusal()


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
    found = [
        (tenant, version)
        for tenant in tenant_folders(drop.root)
        for version in version_folders(drop.root, tenant)
    ]
    assert found == [("acme", "v1")]


def test_scan_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert tenant_folders(tmp_path / "nope") == []
    assert version_folders(tmp_path, "nope") == []


# -- register_all -------------------------------------------------------------------------------


def test_register_all_keeps_the_last_good_version_active(drop: Drop, store: Store) -> None:
    drop.put("acme", "v1")
    truncated = drop.put("acme", "v2") / WEIGHTS_FILE
    truncated.write_bytes(truncated.read_bytes()[:-10])
    pickled = drop.put("acme", "v10")
    (pickled / WEIGHTS_FILE).unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "adapter_model.bin")
    drop.put("globex", "v1", source="globex")

    assert drop.register(store) == ["acme@v1", "acme@v2", "acme@v10", "globex@v1"]
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


# -- filesystem oddities: each one a refusal with a reason, never an exception, never a hang ------


def verdict(drop: Drop, tenant: str = "acme", version: str = "v1") -> AdapterVersion:
    return bounded(judge, tenant, version, drop.root, drop.base, AdapterLimits())


def refused_because(drop: Drop, tenant: str = "acme", version: str = "v1") -> str:
    found = verdict(drop, tenant, version)
    assert found.state == "refused", found
    assert found.reason
    return found.reason


def make_socket(path: Path) -> None:
    """A Unix socket at `path` (bound relative to its folder: socket paths are short)."""
    sock = socket.socket(socket.AF_UNIX)
    cwd = Path.cwd()
    os.chdir(path.parent)
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
        sock.close()


def make_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")


ODD_MEMBERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "loop": (lambda path: path.symlink_to(path.name), "is a symbolic link loop"),
    "two-link-loop": (
        lambda path: (path.symlink_to("other"), (path.parent / "other").symlink_to(path.name)),
        "is a symbolic link loop",
    ),
    "dangling-link": (lambda path: path.symlink_to("nowhere"), "is missing or a link to nothing"),
    "fifo": (os.mkfifo, "is a FIFO, not a regular file"),
    "link-to-fifo": (
        lambda path: (os.mkfifo(path.parent / "pipe"), path.symlink_to("pipe")),
        "is a FIFO, not a regular file",
    ),
    "socket": (make_socket, "is a socket, not a regular file"),
    "device": (make_device, "is a character device, not a regular file"),
    "folder": (Path.mkdir, "is a folder, not a regular file"),
}


@pytest.mark.parametrize("member", [WEIGHTS_FILE, CONFIG_FILE])
@pytest.mark.parametrize("oddity", sorted(ODD_MEMBERS))
def test_odd_files_are_refused_unopened(drop: Drop, store: Store, member: str, oddity: str) -> None:
    make, reason = ODD_MEMBERS[oddity]
    path = drop.put() / member
    path.unlink()
    make(path)
    assert refused_because(drop) == f"{member} {reason}"
    drop.put("globex", "v1", source="globex")
    assert bounded(drop.register, store) == ["acme@v1", "globex@v1"]
    assert state_of(store, "acme", "v1") == "refused"
    assert state_of(store, "globex", "v1") == "ready"


ODD_FOLDERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "loop": (lambda path: path.symlink_to(path.name), "the version folder is a symbolic link loop"),
    "two-link-loop": (
        lambda path: (path.symlink_to("v9"), (path.parent / "v9").symlink_to(path.name)),
        "the version folder is a symbolic link loop",
    ),
    "dangling-link": (
        lambda path: path.symlink_to("nowhere"),
        "the version folder is missing or a link to nothing",
    ),
}


@pytest.mark.parametrize("oddity", sorted(ODD_FOLDERS))
def test_odd_version_folders_are_refused(drop: Drop, store: Store, oddity: str) -> None:
    make, reason = ODD_FOLDERS[oddity]
    drop.put("acme", "v1")
    make(drop.root / "acme" / "v2")
    assert "v2" in version_folders(drop.root, "acme")
    assert refused_because(drop, "acme", "v2") == reason
    bounded(drop.register, store)
    assert state_of(store, "acme", "v2") == "refused"
    assert active_version(store, "acme") == "v1"


def test_a_tenant_folder_that_loops_is_refused_with_an_event(drop: Drop, store: Store) -> None:
    drop.put("globex", "v1", source="globex")
    (drop.root / "acme").symlink_to("acme")
    assert "acme" in tenant_folders(drop.root)
    with pytest.raises(AdapterError, match="the tenant folder is a symbolic link loop"):
        version_folders(drop.root, "acme")
    assert bounded(drop.register, store) == ["globex@v1"]
    (event,) = [e for e in store.events() if e["kind"] == "adapter_refused"]
    assert (event["tenant"], event["detail"]) == ("acme", "the tenant folder is a symbolic link loop")


def test_a_file_where_a_version_folder_belongs_is_not_a_version(drop: Drop) -> None:
    (drop.root / "acme").mkdir()
    (drop.root / "acme" / "v1").write_text("not a folder")
    os.mkfifo(drop.root / "acme" / "v2")
    assert version_folders(drop.root, "acme") == []


def test_a_fifo_swapped_in_after_the_check_cannot_hang(drop: Drop, monkeypatch: pytest.MonkeyPatch) -> None:
    """lstat says "regular file" (the file was one then); the FIFO is what the open meets."""
    weights = drop.put() / WEIGHTS_FILE
    regular = weights.with_name("regular")
    weights.rename(regular)
    os.mkfifo(weights)
    real_lstat = os.lstat

    def lstat_before_the_swap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return real_lstat(regular if Path(path) == weights else path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat_before_the_swap)
    assert refused_because(drop) == f"{WEIGHTS_FILE} changed while being read (no longer a regular file)"


def test_a_link_swapped_in_after_the_check_is_not_followed(
    drop: Drop, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    weights = drop.put() / WEIGHTS_FILE
    regular = weights.with_name("regular")
    weights.rename(regular)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(regular, outside)
    weights.symlink_to(outside)
    real_lstat = os.lstat
    monkeypatch.setattr(
        os, "lstat", lambda path, *a, **k: real_lstat(regular if Path(path) == weights else path, *a, **k)
    )
    assert refused_because(drop) == f"{WEIGHTS_FILE} changed while being read"


def test_a_file_cut_while_it_is_hashed_is_refused(drop: Drop, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = drop.put() / WEIGHTS_FILE
    real_parse = drops.parse_header

    def parse_then_cut(*args: Any) -> Any:
        header = real_parse(*args)
        os.truncate(weights, weights.stat().st_size // 2)  # a writer truncates the file mid-read
        return header

    monkeypatch.setattr(drops, "parse_header", parse_then_cut)
    assert refused_because(drop) == f"{WEIGHTS_FILE} changed while being read"


def test_a_file_replaced_while_it_is_read_gives_the_verdict_on_what_was_opened(
    drop: Drop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaced by rename mid-read: the open file is still the old one, judged whole; the new one
    has a new fingerprint, so the next sync judges it too."""
    folder = drop.put()
    before = drops.fingerprint(folder)
    expected = drop.inspect().sha256
    real_parse = drops.parse_header

    def parse_then_replace(*args: Any) -> Any:
        header = real_parse(*args)
        replacement = folder / ".new"
        replacement.write_bytes(b"garbage")
        replacement.rename(folder / WEIGHTS_FILE)
        return header

    monkeypatch.setattr(drops, "parse_header", parse_then_replace)
    found = verdict(drop)
    assert (found.state, found.sha256) == ("ready", expected)
    assert drops.fingerprint(folder) != before


def test_files_vanishing_before_the_open_are_refused(drop: Drop, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = drop.put() / WEIGHTS_FILE
    real_open = os.open

    def vanish_then_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path) == weights:
            weights.unlink()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", vanish_then_open)
    assert refused_because(drop) == f"{WEIGHTS_FILE} changed while being read"


def test_a_version_folder_gone_before_it_is_judged_is_refused(drop: Drop) -> None:
    shutil.rmtree(drop.put())
    assert refused_because(drop) == "the version folder is missing or a link to nothing"


class Denied:
    """Permission denied, as mode 000 gives it to an unprivileged user (root reads anything, and the
    suite may run as root): for a folder its listing and everything below it, for a file its open."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.paths: set[Path] = set()
        for name in ("open", "lstat", "stat", "scandir", "listdir"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._guard(name, real))

    def __call__(self, path: Path) -> None:
        self.paths.add(path)

    def _denied(self, name: str, path: Path) -> bool:
        if any(denied in path.parents for denied in self.paths):
            return True
        return path in self.paths and (name in ("scandir", "listdir") or (name == "open" and path.is_file()))

    def _guard(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, os.PathLike)) and self._denied(name, Path(os.path.abspath(path))):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        return guarded


@pytest.mark.parametrize(
    ("denied", "reason"),
    [
        (WEIGHTS_FILE, f"{WEIGHTS_FILE}: permission denied"),
        (CONFIG_FILE, f"{CONFIG_FILE}: permission denied"),
        ("", f"{WEIGHTS_FILE}: permission denied"),  # the version folder itself
    ],
    ids=["weights", "config", "folder"],
)
def test_permission_denied_is_refused(
    drop: Drop, store: Store, monkeypatch: pytest.MonkeyPatch, denied: str, reason: str
) -> None:
    folder = drop.put()
    Denied(monkeypatch)(folder / denied if denied else folder)
    assert refused_because(drop) == reason
    bounded(drop.register, store)
    assert state_of(store, "acme", "v1") == "refused"


def test_an_unreadable_tenant_folder_keeps_its_registered_versions(
    drop: Drop, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreadable is not empty: what was registered stays (and serves), and an event says why."""
    drop.put("acme", "v1")
    drop.register(store)
    Denied(monkeypatch)(drop.root / "acme")
    for _ in range(2):
        assert bounded(drop.register, store) == ["acme@v1"]
    assert active_version(store, "acme") == "v1"
    refusals = [e for e in store.events() if e["kind"] == "adapter_refused"]
    assert [(e["tenant"], e["detail"]) for e in refusals] == [
        ("acme", "the tenant folder: permission denied")
    ]


def test_an_unreadable_adapters_directory_lists_nothing(drop: Drop, monkeypatch: pytest.MonkeyPatch) -> None:
    drop.put()
    Denied(monkeypatch)(drop.root)
    assert tenant_folders(drop.root) == []


def test_huge_sparse_files_are_refused_by_size_without_reading_them(drop: Drop) -> None:
    folder = drop.put()
    os.truncate(folder / CONFIG_FILE, 64 << 30)
    assert refused_because(drop) == f"{CONFIG_FILE} is larger than {drops.MAX_CONFIG_BYTES} bytes"
    drop.put("acme", "v2")
    os.truncate(drop.root / "acme" / "v2" / WEIGHTS_FILE, 3 << 30)
    assert "the limit is" in refused_because(drop, "acme", "v2")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"a":' * 150_000 + b"1" + b"}" * 150_000, "not valid JSON (RecursionError)"),
        (b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}", "not valid JSON (ValueError)"),
        (b'{"peft_type": "' + b"x" * 900_000 + b'"}', "peft_type must be LORA, not 'xxxx"),
    ],
    ids=["nested", "huge-int", "huge-string"],
)
def test_hostile_configs_are_refused_with_a_short_reason(drop: Drop, content: bytes, reason: str) -> None:
    (drop.put() / CONFIG_FILE).write_bytes(content)
    refusal = refused_because(drop)
    assert reason in refusal
    assert len(refusal) <= drops.MAX_REASON_CHARS


# `re` backtracks through every way to split a module name between two equal alternatives: 2^31
# steps for `model.layers.0.self_attn.q_proj`, minutes each, holding the interpreter all along.
BACKTRACKING = r"(.*)*z"


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": BACKTRACKING},
        {"exclude_modules": BACKTRACKING},
        {"rank_pattern": {BACKTRACKING: 4}},
        {"alpha_pattern": {BACKTRACKING: 4}},
        {"layers_to_transform": [0], "layers_pattern": BACKTRACKING},
    ],
    ids=["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"],
)
def test_patterns_that_backtrack_for_minutes_are_matched_in_milliseconds(
    drop: Drop, changes: dict[str, Any]
) -> None:
    """PEFT's matching runs on the `regex` module here, which does not backtrack through these."""
    edit_config(drop.put(), **changes)
    began = time.perf_counter()
    bounded(judge, "acme", "v1", drop.root, drop.base, AdapterLimits(), timeout=30)
    assert time.perf_counter() - began < 5


def test_matching_that_runs_out_of_time_is_refused(drop: Drop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peftconfig, "MATCH_BUDGET_S", 0.0)
    edit_config(drop.put(), target_modules=r".*\.(q|v)_proj")
    assert "took over 0 s; simplify its regular expressions" in drop.refusal()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"target_modules": "(unclosed"}, "target_modules holds '(unclosed', not a valid regular expression"),
        (
            {"rank_pattern": {"q_proj": "4"}},
            "rank_pattern for model.layers.0.self_attn.q_proj must be a positive",
        ),
        (
            {"alpha_pattern": {"q_proj": None}},
            "alpha_pattern for model.layers.0.self_attn.q_proj must be a finite",
        ),
        ({"rank_pattern": {"x" * 2000: 4}}, "a pattern of 2000 characters"),
        ({"rank_pattern": [1, 2]}, "rank_pattern must be an object"),
        ({"target_modules": [1, 2]}, "must be module names or one regular expression"),
        ({"use_shiny_variant": True}, "use_shiny_variant=True is an option the PEFT here"),
        ({"shiny_config": {"a": 1}}, "shiny_config={'a': 1} is an option the PEFT here"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication=[[0, 2], [1, 2]] (stacked copies"),
        ({"init_lora_weights": "corda"}, "(CorDA) trained against base weights it changed"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"task_type": "NOT_A_TASK"}, "PEFT cannot read it (ValueError: \"Invalid task type: 'NOT_A_TASK'"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else None,
)
def test_config_values_peft_reads_are_refused_naming_the_option(
    drop: Drop, changes: dict[str, Any], reason: str
) -> None:
    edit_config(drop.put(), **changes)
    assert reason in drop.refusal()


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": ["q_proj", "v_proj", "qkv_proj"]},  # PEFT ignores names matching nothing
        {"target_modules": "model.layers.\\d.self_attn.(q|v)_proj"},
        {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj", "model.layers.1.self_attn.q_proj"]},
        {"newer_peft_setting": 16, "other_new_default": None, "runtime_config": {"x": 1}},
        {"fan_in_fan_out": True, "megatron_config": None, "velora_config": None},
    ],
    ids=["unknown-names", "regex", "paths-and-suffixes", "newer-peft-defaults", "inert-options"],
)
def test_configs_peft_reads_alike_are_accepted(drop: Drop, changes: dict[str, Any]) -> None:
    edit_config(drop.put(), **changes)
    assert drop.inspect().target_modules == ("q_proj", "v_proj")


def weights_with_header(folder: Path, header: bytes, data: bytes = b"") -> None:
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b" " * (MAX_ADAPTER_HEADER_BYTES + 1), "safetensors header too large"),
        (b"[" * 200_000 + b"]" * 200_000, "not a safetensors file (RecursionError"),
        (b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', "(ValueError"),
        (
            json.dumps({"t": {"dtype": "U8", "shape": [1] * 1000, "data_offsets": [0, 1]}}).encode(),
            "malformed entry for tensor 't'",
        ),
        (json.dumps({"t" * 500_000: {"dtype": "U8"}}).encode(), "malformed entry for tensor 'tttt"),
    ],
    ids=["over-the-cap", "nested", "huge-int", "many-dimensions", "huge-name"],
)
def test_hostile_headers_are_refused_with_a_short_reason(drop: Drop, header: bytes, reason: str) -> None:
    weights_with_header(drop.put(), header, b"\0")
    refusal = refused_because(drop)
    assert reason in refusal
    assert len(refusal) <= drops.MAX_REASON_CHARS


def test_the_worst_header_under_the_cap_is_parsed_quickly(drop: Drop) -> None:
    """A million tiny JSON values just under the cap: parsed (and refused) in well under a second
    of CPU, which bounds how long a header can hold the interpreter (and so the event loop) at all.
    CPU time, not wall time: on a busy machine the parse waits for a CPU, holding nothing."""
    entries = (MAX_ADAPTER_HEADER_BYTES - 2) // 10
    header = ("{" + ",".join(f'"{i:05x}":0' for i in range(entries)) + "}").encode()
    assert len(header) <= MAX_ADAPTER_HEADER_BYTES
    weights_with_header(drop.put(), header)
    began = time.process_time()
    assert "malformed entry" in refused_because(drop)
    assert time.process_time() - began < 2.0


@pytest.mark.parametrize(
    "raw_name",
    [b"v\xff", b"v1\nforged event", b"v\x1b[31m", b"\xe2\x80\xae1v", "v" * 200],
    ids=["not-utf8", "newline", "escape", "bidi", "too-long"],
)
def test_odd_version_names_are_refused_printably(drop: Drop, store: Store, raw_name: bytes | str) -> None:
    name = os.fsdecode(raw_name)
    shutil.copytree(drop.pristine / "acme", drop.root / "acme" / name)
    drop.put("acme", "v1")
    assert bounded(drop.register, store) == ["acme@v1"]
    (event,) = [e for e in store.events() if e["kind"] == "adapter_refused"]
    assert event["version"] == drops.printable(name)
    assert event["version"].isprintable()
    assert len(event["version"]) <= 64
    assert "invalid version folder name" in event["detail"]


def test_odd_tenant_names_are_refused_printably(drop: Drop, store: Store) -> None:
    shutil.copytree(drop.pristine / "acme", drop.root / os.fsdecode(b"ac\xffme\n") / "v1")
    assert bounded(drop.register, store) == []
    (event,) = [e for e in store.events() if e["kind"] == "adapter_refused"]
    assert event["tenant"] == "ac\\udcffme\\n"
    assert "invalid tenant folder name" in event["detail"]


def test_an_unexpected_error_costs_one_version_not_the_caller(
    drop: Drop, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("a bug")

    drop.put("acme", "v1")
    monkeypatch.setattr(drops, "_read_config", broken)
    assert refused_because(drop) == "could not be inspected (ZeroDivisionError)"


def test_fingerprints_never_raise_and_see_a_replacement_of_equal_size_and_time(drop: Drop) -> None:
    folder = drop.put()
    weights = folder / WEIGHTS_FILE
    before = drops.fingerprint(folder)
    times = weights.stat()
    copy = folder / ".copy"  # what rsync does: a temporary file renamed over the old one
    shutil.copy(weights, copy)
    os.utime(copy, ns=(times.st_atime_ns, times.st_mtime_ns))
    copy.rename(weights)
    assert drops.fingerprint(folder) != before
    weights.unlink()
    weights.symlink_to(weights.name)
    looped = drops.fingerprint(folder)
    assert looped != before
    assert drops.fingerprint(drop.root / "acme" / "nope") != looped


def test_every_oddity_at_once_leaves_the_good_versions_serving(drop: Drop, store: Store) -> None:
    """One sweep over a folder holding all of the above, as at start-up: nothing raises or hangs."""
    drop.put("acme", "v1")
    drop.put("globex", "v1", source="globex")
    os.mkfifo(drop.put("acme", "v2") / "fifo-unused")
    fifo = drop.put("acme", "v3") / WEIGHTS_FILE
    fifo.unlink()
    os.mkfifo(fifo)
    looped = drop.put("acme", "v4") / WEIGHTS_FILE
    looped.unlink()
    looped.symlink_to(looped.name)
    (drop.root / "acme" / "v5").symlink_to("v5")
    (drop.root / "acme" / "v6").mkdir()
    (drop.root / "loop").symlink_to("loop")
    (drop.root / "initech").mkdir()
    os.mkfifo(drop.root / "initech" / "v1")
    shutil.copytree(drop.pristine / "acme", drop.root / "acme" / os.fsdecode(b"v\xff"))
    assert bounded(drop.register, store) == [
        "acme@v1",
        "acme@v2",
        "acme@v3",
        "acme@v4",
        "acme@v5",
        "acme@v6",
        "globex@v1",
    ]
    assert active_version(store, "acme") == "v2"  # a stray FIFO beside the files is not read
    assert active_version(store, "globex") == "v1"
    reasons = {a.version: a.reason for a in store.adapters("acme") if a.state == "refused"}
    assert reasons == {
        "v3": f"{WEIGHTS_FILE} is a FIFO, not a regular file",
        "v4": f"{WEIGHTS_FILE} is a symbolic link loop",
        "v5": "the version folder is a symbolic link loop",
        "v6": f"missing {WEIGHTS_FILE}",
    }


# -- the registry: what thousands of folders may cost -------------------------------------------


def empty_versions(tenant_dir: Path, count: int, first: int = 2) -> None:
    for index in range(first, first + count):
        (tenant_dir / f"v{index}").mkdir(parents=True)


@pytest.fixture
def big_drop(tmp_path: Path, built: Path, base: BaseModelInfo) -> Iterator[Drop]:
    """A drop folder where 10,000 folders are quick to make."""
    with tmpfs_dir(tmp_path) as scratch:
        root = scratch / "adapters"
        root.mkdir()
        yield Drop(root, built / "pristine", base)


def test_ten_thousand_empty_versions_are_twenty_rows_and_one_event(big_drop: Drop, store: Store) -> None:
    drop = big_drop
    drop.put("acme", "v1")
    drop.put("globex", "v1", source="globex")
    empty_versions(drop.root / "acme", 10_000)
    began = time.process_time()  # CPU time (of every thread): what a loaded machine does not stretch
    bounded(drop.register, store, timeout=60)
    took = time.process_time() - began

    acme = store.adapters("acme")
    refused = [a.version for a in acme if a.state == "refused"]
    assert refused == [f"v{i}" for i in range(9_982, 10_002)]  # the newest 20
    assert all(a.reason == f"missing {WEIGHTS_FILE}" for a in acme if a.state == "refused")
    assert active_version(store, "acme") == "v1"
    assert active_version(store, "globex") == "v1"
    events = store.events(limit=1000)
    assert len([e for e in events if e["kind"] == "adapter_refused"]) == 21
    (summary,) = [e for e in events if e["kind"] == "adapter_refused" and not e["version"]]
    assert summary["tenant"] == "acme"
    assert summary["detail"].startswith("9980 more refused version folders not listed")
    assert f"v2: missing {WEIGHTS_FILE}" in summary["detail"]
    assert took < 30, f"{took:.1f} s"  # measured about 1 s on two busy cores

    # Nothing changed: nothing is judged again, nothing is written.
    bounded(drop.register, store, timeout=60)
    assert store.events(limit=1000) == events

    # One more junk folder: the summary says so, once; the listed rows move with the newest.
    empty_versions(drop.root / "acme", 1, first=10_002)
    drop.register(store)
    new = store.events(limit=5)
    assert [e["kind"] for e in new[:3]] == ["adapter_refused", "adapter_removed", "adapter_refused"]
    assert new[0]["detail"].startswith("9981 more refused")
    assert "still on disk" in new[1]["detail"]
    assert new[2]["version"] == "v10002"

    for index in range(2, 10_003):
        (drop.root / "acme" / f"v{index}").rmdir()
    bounded(drop.register, store, timeout=60)
    assert [a.label for a in store.adapters()] == ["acme@v1", "globex@v1"]


def test_only_the_newest_servable_versions_are_registered_and_hashed(
    drop: Drop, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A farm of links to one good adapter: the newest 100 are hashed and listed, plus the version
    the operator pinned; the rest cost a name each."""
    drop.put("acme", "v1")
    for index in range(2, 131):
        folder = drop.root / "acme" / f"v{index}"
        folder.mkdir()
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (folder / name).symlink_to(Path("..") / "v1" / name)
    store.save_route(Route("acme", pinned_version="v7"))
    hashed: list[str] = []
    real_digest = drops._digest
    monkeypatch.setattr(drops, "_digest", lambda *args: hashed.append("x") or real_digest(*args))

    drop.register(store)
    listed = [a.version for a in store.adapters("acme")]
    assert listed == ["v7", *(f"v{i}" for i in range(31, 131))]
    assert len(hashed) == 101
    (summary,) = [e for e in store.events() if not e["version"]]
    assert summary["detail"] == "29 version folders older than the newest 100 servable ones ignored"


def test_a_tenant_whose_versions_all_fail_keeps_nothing_but_the_newest_refusals(
    drop: Drop, store: Store
) -> None:
    empty_versions(drop.root / "acme", 30, first=1)
    drop.register(store)
    assert len(store.adapters("acme")) == registry.MAX_LISTED_REFUSALS
    assert active_version(store, "acme") is None


def test_rows_of_an_older_daemon_beyond_the_caps_are_removed_in_batches(drop: Drop, store: Store) -> None:
    """A registry written before the caps (one row per folder) is brought down to them."""
    empty_versions(drop.root / "acme", 500, first=1)
    for index in range(1, 501):
        store.register_adapter(
            AdapterVersion("acme", f"v{index}", "/x", "", 0, 0.0, (), 0, "refused", f"missing {WEIGHTS_FILE}")
        )
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    drop.register(store)
    store.db.conn.set_trace_callback(None)
    assert len(store.adapters("acme")) == registry.MAX_LISTED_REFUSALS
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    assert len(commits) == -(-(480 + 1) // registry.BATCH)  # 480 removals and the summary


def test_a_pacer_rests_as_long_as_the_work_ran() -> None:
    """Background work at half of one CPU: every slice of work is followed by as long a rest."""
    pace = Pacer(slice_s=0.01)
    worked = 0.0
    began = time.perf_counter()
    while worked < 0.2:
        step = time.perf_counter()
        sum(range(2_000))  # a unit of work
        worked += time.perf_counter() - step
        pace()
    assert time.perf_counter() - began >= 2 * worked - 0.011  # the last slice may be unrested


def test_registry_writes_wait_for_other_writers_instead_of_failing(
    drop: Drop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry writes from its own connection while the loop's (and the ledger's) write too.
    Another connection commits between the registry's first read and its first write: with a
    plain BEGIN that was "database is locked" at once, and the drop was lost."""
    database = tmp_path / "state.db"
    store = Store.connect(database)
    drop.put("acme", "v1")
    writer: list[threading.Thread] = []
    real_get = store.get_adapter

    def get_then_another_commits(*args: Any) -> Any:
        found = real_get(*args)
        if not writer:
            thread = threading.Thread(
                target=lambda: Store.connect(database).record_event("tenant_added", tenant="other")
            )
            writer.append(thread)
            thread.start()
            thread.join(0.5)  # it commits now, or waits for the registry's transaction to end
        return found

    monkeypatch.setattr(store, "get_adapter", get_then_another_commits)
    drop.registry.reconcile(store, "acme")
    writer[0].join(10)
    assert active_version(store, "acme") == "v1"
    assert [e["kind"] for e in store.events()][:2] == ["tenant_added", "adapter_registered"]


# -- the base model an adapter names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("named", "note"),
    [
        ("lorabox-demo", ""),  # the served name
        ("acme-labs/model", ""),  # a hub id whose name is the base's folder name
        ("/elsewhere/MODEL/", ""),
        (None, ""),
        ("", ""),
        (
            "unsloth/llama-3-8b-bnb-4bit",
            "trained on 'unsloth/llama-3-8b-bnb-4bit'; this box serves 'lorabox-demo'",
        ),
    ],
)
def test_an_adapter_naming_another_base_is_accepted_with_a_note(
    drop: Drop, named: str | None, note: str
) -> None:
    edit_config(drop.put(), base_model_name_or_path=named)
    found = drop.inspect()
    assert (found.state, found.note, found.base_model) == ("ready", note, named or "")


def strict_registry(drop: Drop) -> FolderRegistry:
    return FolderRegistry(drop.root, drop.base, AdapterLimits(), strict_base_match=True)


def test_another_base_serves_flagged_by_default(drop: Drop, store: Store) -> None:
    edit_config(drop.put(), base_model_name_or_path="org/other-model")
    drop.registry.reconcile(store, "acme")
    assert active_version(store, "acme") == "v1"
    events = [(e["kind"], e["detail"]) for e in store.events()]
    assert ("adapter_base_mismatch", "trained on 'org/other-model'; this box serves 'lorabox-demo'") in events


def test_strict_base_match_holds_another_base_until_accepted_by_content(drop: Drop, store: Store) -> None:
    folder = drop.put()
    edit_config(folder, base_model_name_or_path="org/other-model")
    registry = strict_registry(drop)
    registry.reconcile(store, "acme")
    held = store.get_adapter("acme", "v1")
    assert held is not None
    assert held.state == "held"
    assert held.reason.endswith("strict_base_match holds it until `lorabox adapters accept acme v1`")
    assert active_version(store, "acme") is None

    store.accept_base(held, actor="ops")
    registry.reconcile(store, "acme")  # no file changed: the acceptance alone decides
    assert state_of(store, "acme", "v1") == "ready"
    assert active_version(store, "acme") == "v1"
    assert store.audit_log("acme")[0]["action"] == "adapter_accept"

    edit_config(folder, base_model_name_or_path="org/other-model", lora_alpha=32)  # other bytes
    registry.reconcile(store, "acme")
    assert state_of(store, "acme", "v1") == "held"
    kinds = [e["kind"] for e in store.events()]
    assert kinds[:4] == [
        "adapter_held",
        "adapter_base_mismatch",
        "adapter_registered",
        "adapter_base_accepted",
    ]


def test_strict_base_match_leaves_adapters_of_the_served_base_alone(drop: Drop, store: Store) -> None:
    drop.put()
    strict_registry(drop).reconcile(store, "acme")
    assert state_of(store, "acme", "v1") == "ready"
