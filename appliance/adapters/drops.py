"""The drop folder: find adapter versions and decide, with a reason, whether each can be served.

Layout: `<adapters_dir>/<tenant>/<version>/{adapter_config.json, adapter_model.safetensors}`.
Nothing here unpickles, imports or executes anything from an adapter folder: the config is JSON
and the weights are checked through their safetensors header only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..names import is_ignored_name, is_tenant_name, is_version_name
from ..tenancy.store import AdapterVersion, Store
from .safetensors_header import read_header

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class BaseModelInfo:
    """Shapes of the base model's linear layers, read from its own safetensors headers."""

    linear_shapes: dict[str, tuple[int, int]]  # module path → (out_features, in_features)

    @property
    def module_names(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.linear_shapes}

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseModelInfo:
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            shards = ["model.safetensors"]
        shapes: dict[str, tuple[int, int]] = {}
        for shard in shards:
            for name, info in read_header(model_dir / shard).items():
                if name.endswith(".weight") and len(info.shape) == 2 and "embed" not in name:
                    shapes[name.removesuffix(".weight")] = (info.shape[0], info.shape[1])
        return cls(shapes)


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64
    max_bytes: int = 2 << 30


def scan(adapters_dir: Path) -> Iterator[tuple[str, str, Path]]:
    """Every (tenant, version, folder) candidate under adapters_dir, copies in progress skipped.

    Badly named folders are yielded too, so that they are refused with a reason, not ignored.
    """
    if not adapters_dir.is_dir():
        return
    for tenant_dir in sorted(adapters_dir.iterdir()):
        if not is_ignored_name(tenant_dir.name) and tenant_dir.is_dir():
            yield from scan_tenant(adapters_dir, tenant_dir.name)


def scan_tenant(adapters_dir: Path, tenant: str) -> Iterator[tuple[str, str, Path]]:
    tenant_dir = adapters_dir / tenant
    if is_ignored_name(tenant) or not tenant_dir.is_dir():
        return
    for version_dir in sorted(tenant_dir.iterdir()):
        if not is_ignored_name(version_dir.name) and version_dir.is_dir():
            yield tenant, version_dir.name, version_dir


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def inspect(
    tenant: str, version: str, folder: Path, base: BaseModelInfo, limits: AdapterLimits, root: Path
) -> AdapterVersion:
    """Validate one version folder; raises AdapterError with the reason it cannot be served."""
    if not is_tenant_name(tenant):
        raise AdapterError(f"invalid tenant folder name {tenant!r}")
    if not is_version_name(version):
        raise AdapterError(f"invalid version folder name {version!r}")
    # Links may not leave the tenant's own folder: not out of the adapters directory, and not
    # into another tenant's adapters either.
    tenant_root = root / tenant
    if not (_inside(tenant_root, root) and _inside(folder, tenant_root)):
        raise AdapterError("folder is a link that leaves the adapters directory or its tenant's folder")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if path.is_symlink() and not _inside(path, tenant_root):
            raise AdapterError(
                f"{path.name} is a link that leaves the adapters directory or its tenant's folder"
            )
    if not weights_path.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(f"pickle weights ({', '.join(pickled)}) are refused; ship {WEIGHTS_FILE}")
        raise AdapterError(f"missing {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise AdapterError(f"missing {CONFIG_FILE}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    size = weights_path.stat().st_size
    if size > limits.max_bytes:
        raise AdapterError(f"{WEIGHTS_FILE} is {size} bytes; the limit is {limits.max_bytes}")

    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type must be LORA, not {config.get('peft_type')!r}")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"rank r must be a positive integer, not {rank!r}")
    if rank > limits.max_rank:
        raise AdapterError(f"rank {rank} exceeds the engine's max_lora_rank {limits.max_rank}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a finite number, not {alpha!r}")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError("adapters with trained biases are not supported (bias must be 'none')")
    if config.get("modules_to_save"):
        raise AdapterError("modules_to_save (full-weight copies) is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets:
        raise AdapterError("target_modules must be a non-empty list of module names")
    unknown = sorted(set(map(str, targets)) - base.module_names)
    if unknown:
        raise AdapterError(f"target modules not in the base model: {', '.join(unknown)}")

    _check_tensors(read_header(weights_path), base, rank, set(map(str, targets)))
    digest = hashlib.sha256(config_bytes)
    with weights_path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return AdapterVersion(
        tenant=tenant,
        version=version,
        path=str(folder.resolve()),
        sha256=digest.hexdigest(),
        rank=rank,
        alpha=float(alpha),
        target_modules=tuple(sorted(map(str, targets))),
        size_bytes=size,
    )


def _check_tensors(tensors: dict, base: BaseModelInfo, rank: int, targets: set[str]) -> None:  # type: ignore[type-arg]
    if not tensors:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    pairs: dict[str, set[str]] = {}
    for name, info in tensors.items():
        stem, _, kind = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise AdapterError(f"unexpected tensor {name!r} (only lora_A / lora_B weights are served)")
        if stem not in base.linear_shapes:
            raise AdapterError(f"tensor {name!r} targets a layer the base model does not have")
        out_features, in_features = base.linear_shapes[stem]
        expected = (rank, in_features) if kind == "A.weight" else (out_features, rank)
        if info.shape != expected:
            raise AdapterError(f"tensor {name!r} has shape {list(info.shape)}, expected {list(expected)}")
        pairs.setdefault(stem, set()).add(kind)
    unpaired = sorted(stem for stem, kinds in pairs.items() if len(kinds) != 2)
    if unpaired:
        raise AdapterError(f"lora_A/lora_B pairs incomplete for {unpaired[0]}")
    present = {stem.rsplit(".", 1)[-1] for stem in pairs}
    if present != set(targets):
        raise AdapterError(
            f"tensors cover modules {sorted(present)} but target_modules says {sorted(targets)}"
        )


def register_version(
    store: Store,
    tenant: str,
    version: str,
    folder: Path,
    base: BaseModelInfo,
    limits: AdapterLimits,
    root: Path,
) -> AdapterVersion | None:
    """Inspect one version and record the verdict: ready, or refused with its reason.

    Returns None when the names are too broken to be a registry row (an event records why).
    """
    try:
        adapter = inspect(tenant, version, folder, base, limits, root)
    except (AdapterError, OSError) as exc:
        log.warning("refused adapter %s/%s: %s", tenant, version, exc)
        if not (is_tenant_name(tenant) and is_version_name(version)):
            store.record_event("adapter_refused", tenant=tenant[:64], version=version[:64], detail=str(exc))
            return None
        adapter = AdapterVersion(tenant, version, str(folder), "", 0, 0.0, (), 0, "refused", str(exc))
    store.register_adapter(adapter)
    return adapter
