"""The drop folder: find adapter versions and decide, with a reason, whether each can be served.

Layout: `<adapters_dir>/<tenant>/<version>/{adapter_config.json, adapter_model.safetensors}`, or
`adapter_model.gguf` alone (a GGUF LoRA, for the engines that load one). Nothing here unpickles,
imports or executes anything from an adapter folder: the config is JSON, read as PEFT reads it
(peftconfig.py), and the weights are checked through their header only.

The verdict is the same for every engine but where an engine declares otherwise (its
`AdapterSupport`): what it cannot serve exactly is refused here, in one line naming the option,
the engine and the way out, never found out by a wrong answer.

Whoever drops adapters owns the folder, so every filesystem oddity is to be expected: links that
loop or lead out, FIFOs, devices, sockets, unreadable files and folders, files replaced or cut
while they are read, huge headers and configs, names that are not UTF-8. Each one is a refusal,
with its reason, of that one version; `judge` never raises. Nothing but a regular file is ever
opened (a FIFO opened for reading waits for a writer: forever), and files are opened non-blocking
and checked again once open, so a swap between the check and the open cannot hang a thread either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..engines.base import AdapterSupport
from ..errors import AdapterError, ConversionError
from ..gguf.adapterfile import GGUF_FILE, check_against, read_gguf_lora
from ..gguf.layout import Layout, read_hf_config
from ..names import is_ignored_name, is_tenant_name, is_version_name
from ..tenancy.store import AdapterVersion
from . import peftconfig
from .peftconfig import CONFIG_FILE, NO_ENGINE, LoraReading, short
from .safetensors_header import MAX_ADAPTER_HEADER_BYTES, TensorInfo, parse_header, read_header

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_REASON_CHARS = 400
MAX_NAME_CHARS = 200  # of the base model an adapter names, as stored
PEFT_PREFIX = "base_model.model."
LEAVES = "is a link that leaves the adapters directory or its tenant's folder"
# Regular files only, and an open that cannot block or follow a link swapped in after the check.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC

Fingerprint = tuple[tuple[int, ...], ...]


def model_shards(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (one, or those its index names)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model_dir / "model.safetensors"]


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model's modules and shapes, read from its own safetensors headers."""

    linear_shapes: dict[str, tuple[int, int]]  # module path → (out_features, in_features)
    embeddings: dict[str, tuple[int, int]] = field(default_factory=dict)  # path → (vocabulary, hidden)
    other_modules: frozenset[str] = frozenset()  # modules holding other tensors (norms)
    names: tuple[str, ...] = ()
    """What the base is called, the name it is served as first: an adapter names its base."""
    gguf_architecture: str = ""
    gguf_weights: dict[str, str] = field(default_factory=dict)
    """GGUF weight name (blk.0.attn_q.weight) → module path, for checking GGUF LoRA drops; empty
    for architectures lorabox does not convert."""

    @property
    def module_names(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.linear_shapes}

    @functools.cached_property
    def modules(self) -> frozenset[str]:
        """Every module path PEFT would see in `model.named_modules()`, parents included."""
        owners = {*self.linear_shapes, *self.embeddings, *self.other_modules}
        parents = {path.rsplit(".", depth)[0] for path in owners for depth in range(1, path.count(".") + 1)}
        return frozenset(owners | parents)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseModelInfo:
        shapes: dict[str, tuple[int, int]] = {}
        embeddings: dict[str, tuple[int, int]] = {}
        others: set[str] = set()
        for shard in model_shards(model_dir):
            for name, info in read_header(shard).items():
                module = name.rpartition(".")[0]
                if name.endswith(".weight") and len(info.shape) == 2:
                    (embeddings if "embed" in name else shapes)[module] = (info.shape[0], info.shape[1])
                elif module:
                    others.add(module)
        try:
            layout = Layout.from_hf_config(read_hf_config(model_dir))
        except (ConversionError, KeyError, TypeError, ValueError):
            return cls(shapes, embeddings, frozenset(others), names=_base_names(model_dir))
        gguf_weights = {layout.gguf_name(f"{path}.weight"): path for path in shapes}
        gguf_weights.pop(None, None)
        return cls(
            shapes,
            embeddings,
            frozenset(others),
            names=_base_names(model_dir),
            gguf_architecture=layout.arch,
            gguf_weights={str(name): path for name, path in gguf_weights.items()},
        )

    def named(self, served_name: str) -> BaseModelInfo:
        return dataclasses.replace(self, names=(served_name, *self.names))

    def note_on(self, adapter_base: str) -> str:
        """Why an adapter naming `adapter_base` as its base is flagged; "" when it names this base
        (by path, folder name, recorded or served name; a hub id matches a folder of its name) or
        none. The shapes decide whether it serves: QLoRA adapters name their quantised copy."""
        if not adapter_base.strip() or not self.names:
            return ""

        def forms(name: str) -> set[str]:
            name = name.strip().rstrip("/").lower()
            return {name, name.rsplit("/", 1)[-1]}

        if forms(adapter_base) & set().union(*(forms(n) for n in self.names)):
            return ""
        return f"trained on {short(adapter_base)}; this box serves {self.names[0]!r}"


def _base_names(model_dir: Path) -> tuple[str, ...]:
    names = [str(model_dir), model_dir.name]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
        if isinstance(recorded, str):
            names.append(recorded)
    return tuple(names)


# What every engine serves; an engine's own adds to it (engines/base.py).
COMMON_SUPPORT = AdapterSupport()


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64
    max_bytes: int = 2 << 30
    support: AdapterSupport = COMMON_SUPPORT


def printable(name: str) -> str:
    """A folder name as it can be logged, stored and shown: control characters and bytes that are
    not UTF-8 escaped (`\\n`, `\\udcff`), and no longer than a name may be."""
    return repr(name)[1:-1][:64]


# -- finding versions ---------------------------------------------------------------------------


def _candidates(folder: Path) -> list[str]:
    """Names in `folder` that may be tenants or versions: folders, and links that lead nowhere
    (a loop, a dangling link: refused with that reason, not skipped). Raises OSError."""
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            try:
                if entry.is_symlink():  # a link to a folder, or one that cannot be followed
                    listed = os.path.isdir(entry.path) or not os.path.exists(entry.path)
                else:
                    listed = entry.is_dir(follow_symlinks=False)
            except OSError:  # vanished mid-listing: the next listing decides
                continue
            if listed:
                names.append(entry.name)
    return sorted(names)


def tenant_folders(adapters_dir: Path) -> list[str]:
    """Every tenant folder in the drop folder, badly named ones included (refused with a reason)."""
    try:
        return _candidates(adapters_dir)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.error("cannot list the adapters directory %s: %s", adapters_dir, exc)
        return []


def version_folders(adapters_dir: Path, tenant: str) -> list[str]:
    """The version folders of one tenant, copies in progress left out.

    Raises AdapterError when the tenant's folder exists but cannot be listed.
    """
    if is_ignored_name(tenant) or "/" in tenant or "\0" in tenant:
        return []
    try:
        return _candidates(adapters_dir / tenant)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise AdapterError(_why(exc, "the tenant folder")) from exc


def fingerprint(folder: str | Path) -> Fingerprint:
    """What changes when an adapter's files are written, replaced or relinked (and nothing else)."""
    parts: list[tuple[int, ...]] = []
    members = (CONFIG_FILE, WEIGHTS_FILE, GGUF_FILE)
    for path in (folder, *(os.path.join(folder, name) for name in members)):
        try:
            link = os.lstat(path)
        except OSError as exc:
            parts.append((-1, exc.errno or 0))
            continue
        try:
            target = os.stat(path)
        except OSError as exc:
            parts.append((link.st_ino, link.st_ctime_ns, -1, exc.errno or 0))
            continue
        identity = (link.st_ino, link.st_ctime_ns, target.st_dev, target.st_ino)
        parts.append((*identity, target.st_size, target.st_mtime_ns, target.st_ctime_ns))
    return tuple(parts)


# -- judging one version ------------------------------------------------------------------------


def judge(
    tenant: str,
    version: str,
    root: Path,
    base: BaseModelInfo,
    limits: AdapterLimits,
    *,
    real_root: str | None = None,
) -> AdapterVersion:
    """The verdict on one version folder: ready, or refused with its reason. Never raises.

    A refusal whose names break the contract carries them as `printable` text: it can be an
    event, never a registry row. `real_root`: the adapters directory resolved once for many calls.
    """
    try:
        return inspect(tenant, version, root, base, limits, real_root=real_root)
    except AdapterError as exc:
        reason = str(exc)
    except OSError as exc:
        reason = _why(exc, "the version folder")
    except Exception as exc:  # a bug here must cost one version, not the daemon
        log.exception("inspecting adapter %s/%s failed", printable(tenant), printable(version))
        reason = f"could not be inspected ({type(exc).__name__})"
    if not (is_tenant_name(tenant) and is_version_name(version)):
        tenant, version = printable(tenant), printable(version)
    reason = reason[:MAX_REASON_CHARS]
    path = os.path.join(root, tenant, version)
    return AdapterVersion(tenant, version, path, "", 0, 0.0, (), 0, "refused", reason)


def inspect(
    tenant: str,
    version: str,
    root: Path,
    base: BaseModelInfo,
    limits: AdapterLimits,
    *,
    real_root: str | None = None,
) -> AdapterVersion:
    """Validate `root/tenant/version`; raises AdapterError (or OSError) with why it cannot be served."""
    if not is_tenant_name(tenant):
        raise AdapterError(f"invalid tenant folder name {tenant!r}")
    if not is_version_name(version):
        raise AdapterError(f"invalid version folder name {version!r}")
    # Links may not leave the tenant's own folder: not out of the adapters directory, and not
    # into another tenant's adapters either.
    real_root = real_root or _real(root, "the adapters directory")
    tenant_root = _follow(real_root, tenant, "the tenant folder")
    folder = _follow(tenant_root, version, "the version folder")
    if not (_inside(tenant_root, real_root) and _inside(folder, tenant_root)):
        raise AdapterError(f"folder {LEAVES}")
    if not stat.S_ISDIR(os.stat(folder).st_mode):
        raise AdapterError("the version is a file, not a folder")

    with contextlib.ExitStack() as files:
        weights = _open_member(folder, WEIGHTS_FILE, tenant_root)
        if weights is None and (dropped := _open_member(folder, GGUF_FILE, tenant_root)) is not None:
            files.enter_context(dropped)
            return _inspect_gguf(tenant, version, folder, dropped, base, limits)
        if weights is None:
            pickled = sorted(name for name in _names(folder) if name.endswith(PICKLE_SUFFIXES))
            if pickled:
                raise AdapterError(f"pickle weights ({', '.join(pickled)}) are refused; ship {WEIGHTS_FILE}")
            raise AdapterError(f"missing {WEIGHTS_FILE}")
        files.enter_context(weights)
        config_file = _open_member(folder, CONFIG_FILE, tenant_root)
        if config_file is None:
            raise AdapterError(f"missing {CONFIG_FILE}")
        files.enter_context(config_file)
        config_bytes = config_file.read(MAX_CONFIG_BYTES + 1)
        if len(config_bytes) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        before = os.fstat(weights.fileno())
        if before.st_size > limits.max_bytes:
            raise AdapterError(f"{WEIGHTS_FILE} is {before.st_size} bytes; the limit is {limits.max_bytes}")

        reading = _read_config(config_bytes, base, limits)
        header = parse_header(weights, before.st_size, WEIGHTS_FILE, MAX_ADAPTER_HEADER_BYTES)
        _check_tensors(header, base, reading)
        _check_support(reading, limits.support)
        sha256 = _digest(config_bytes, weights, before)
    return AdapterVersion(
        tenant=tenant,
        version=version,
        path=folder,
        sha256=sha256,
        rank=reading.max_rank,
        alpha=reading.alpha,
        target_modules=tuple(sorted({_leaf(path) for path in (*reading.modules, *reading.embeddings)})),
        size_bytes=before.st_size,
        base_model=reading.base_model[:MAX_NAME_CHARS],
        note=base.note_on(reading.base_model),
    )


def _inspect_gguf(
    tenant: str, version: str, folder: str, dropped: BinaryIO, base: BaseModelInfo, limits: AdapterLimits
) -> AdapterVersion:
    """A GGUF LoRA dropped instead of a PEFT folder: for the engines that load one (llama.cpp)."""
    support = limits.support
    if not support.gguf_lora:
        raise AdapterError(
            f"{GGUF_FILE} is a GGUF LoRA, which {support.by} does not load; drop the PEFT adapter it was "
            f"converted from ({CONFIG_FILE} and {WEIGHTS_FILE}) instead"
        )
    before = os.fstat(dropped.fileno())
    if before.st_size > limits.max_bytes:
        raise AdapterError(f"{GGUF_FILE} is {before.st_size} bytes; the limit is {limits.max_bytes}")
    # The file already opened and checked, by its descriptor: never a file swapped in since.
    lora = read_gguf_lora(f"/proc/self/fd/{dropped.fileno()}", dropped.read(24))
    modules = {name: (path, base.linear_shapes[path]) for name, path in base.gguf_weights.items()}
    check_against(lora, base.gguf_architecture, modules)
    rank = max(rank for _, _, rank in lora.weights.values())
    if rank > limits.max_rank:
        raise AdapterError(f"rank {rank} in {GGUF_FILE} exceeds the engine's max_lora_rank {limits.max_rank}")
    return AdapterVersion(
        tenant=tenant,
        version=version,
        path=folder,
        sha256=_digest(b"", dropped, before, GGUF_FILE),
        rank=rank,
        alpha=lora.alpha,
        target_modules=tuple(sorted({_leaf(base.gguf_weights[w]) for w in lora.weights})),
        size_bytes=before.st_size,
    )


def _why(exc: OSError, what: str) -> str:
    if exc.errno == errno.ELOOP:
        return f"{what} is a symbolic link loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: permission denied"
    if exc.errno == errno.ENOENT:
        return f"{what} is missing or a link to nothing"
    return f"{what} cannot be read: {exc.strerror or exc}"


# Paths below are strings, not pathlib's: these run for every version folder, thousands at once.


def _real(path: str | Path, what: str) -> str:
    try:
        return os.path.realpath(path, strict=True)
    except OSError as exc:
        raise AdapterError(_why(exc, what)) from exc


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _follow(real_parent: str, name: str, what: str) -> str:
    """`real_parent/name` with links followed, for a parent already resolved."""
    path = os.path.join(real_parent, name)
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError as exc:
        raise AdapterError(_why(exc, what)) from exc
    return _real(path, what) if is_link else path


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((label for test, label in kinds if test(mode)), "not a regular file")


def _open_member(folder: str, name: str, tenant_root: str) -> BinaryIO | None:
    """Open one of the version's files for reading, or None when there is none.

    Links must stay in the tenant's folder; anything but a regular file is refused unopened.
    """
    path = os.path.join(folder, name)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            path = _real(path, name)
            if not _inside(path, tenant_root):
                raise AdapterError(f"{name} {LEAVES}")
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AdapterError(_why(exc, name)) from exc
    if not stat.S_ISREG(mode):
        raise AdapterError(f"{name} is {_kind(mode)}, not a regular file")
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:  # ENOENT, ELOOP: it was removed or replaced by a link since the check
        changed = exc.errno in (errno.ENOENT, errno.ELOOP)
        raise AdapterError(f"{name} changed while being read" if changed else _why(exc, name)) from exc
    opened = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        opened.close()
        raise AdapterError(f"{name} changed while being read (no longer a regular file)")
    return opened


def _read_config(raw: bytes, base: BaseModelInfo, limits: AdapterLimits) -> LoraReading:
    """The config as PEFT reads it against this base; refused if no engine, or not this one, serves it."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5,000-digit int, nesting
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must be a JSON object")
    reading = peftconfig.read(config, base, limits.max_rank)
    support = limits.support
    if reading.embeddings and not support.embedding_lora:
        first = next(iter(reading.embeddings))
        raise AdapterError(
            f"target_modules includes {', '.join(reading.embeddings)} (a LoRA on the token embeddings), "
            f"which {support.by} does not serve; train without {_leaf(first)} in target_modules"
        )
    return reading


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _check_tensors(tensors: dict[str, TensorInfo], base: BaseModelInfo, reading: LoraReading) -> None:
    """The weights hold exactly one lora_A/lora_B pair, of the expected shapes, per adapted module."""
    if not tensors:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    pairs: dict[str, set[str]] = {}
    for name, info in tensors.items():
        path = name.removeprefix(PEFT_PREFIX)
        module, _, kind = path.rpartition(".lora_")
        side = {"A.weight": "A", "B.weight": "B"}.get(kind)
        if side is None and module in reading.embeddings:  # PEFT's names for a LoRA on embeddings
            side = {"embedding_A": "A", "embedding_B": "B"}.get(kind)
        if side is None:
            raise AdapterError(_extra_tensor(name, path, info, base, reading))
        expected = _lora_shape(module, side, base, reading)
        if expected is None:
            if module in base.linear_shapes:
                raise AdapterError(
                    f"tensor {short(name)} adapts {module}, which target_modules does not select "
                    "(PEFT would not load it)"
                )
            raise AdapterError(f"tensor {short(name)} targets a layer the base model does not have")
        if info.shape != expected:
            raise AdapterError(
                f"tensor {short(name)} has shape {list(info.shape)}, expected {list(expected)}"
            )
        pairs.setdefault(module, set()).add(side)
    unpaired = sorted(module for module, sides in pairs.items() if len(sides) != 2)
    if unpaired:
        raise AdapterError(f"lora_A/lora_B pairs incomplete for {unpaired[0]}")
    missing = sorted({*reading.modules, *reading.embeddings} - set(pairs))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterError(
            f"target_modules selects {missing[0]}{more}, but {WEIGHTS_FILE} holds no lora_A/lora_B for it"
        )


def _lora_shape(module: str, side: str, base: BaseModelInfo, reading: LoraReading) -> tuple[int, int] | None:
    """PEFT's shape for a module's A or B, at the rank PEFT gives it; None if it adapts no such module.
    A linear layer's A is (rank, in) and B (out, rank); an embedding's A is (rank, vocabulary) and
    B (hidden, rank)."""
    if module in reading.modules:
        out_features, in_features = base.linear_shapes[module]
        rank = reading.modules[module].rank
    elif module in reading.embeddings:
        in_features, out_features = base.embeddings[module]
        rank = reading.embeddings[module].rank
    else:
        return None
    return (rank, in_features) if side == "A" else (out_features, rank)


def _extra_tensor(name: str, path: str, info: TensorInfo, base: BaseModelInfo, reading: LoraReading) -> str:
    """Why a tensor other than a lora_A/lora_B weight is refused: the training option that made it."""
    label = short(name)
    if path.endswith(".lora_B.bias"):
        return (
            f"tensor {label} is a bias on lora_B (lora_bias=true), which {NO_ENGINE} serves; train "
            "with lora_bias=false"
        )
    if path.endswith((".lora_embedding_A", ".lora_embedding_B")):
        return f"tensor {label} is a LoRA on embeddings that target_modules does not select"
    if path.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in path:
        return (
            f"tensor {label} is DoRA's magnitude (use_dora=true), which {NO_ENGINE} serves; train with "
            "use_dora=false"
        )
    if "modules_to_save" in path or ".original_module." in path:
        return f"tensor {label} is a full module copy (modules_to_save), which {NO_ENGINE} loads per tenant"
    module = path.removesuffix(".weight").removesuffix(".base_layer")
    if path.endswith(".weight") and (
        module in base.embeddings or _leaf(module) in peftconfig.EMBEDDING_MODULES
    ):
        own = base.embeddings.get(module) or base.linear_shapes.get(module)
        if own is not None and info.shape[:1] != own[:1]:
            return (
                f"tensor {label} is a {info.shape[0]}-token copy of {module}, but the base has {own[0]}: "
                f"the vocabulary was resized in training, so {NO_ENGINE} serves it on this base; it needs "
                "that resized base model"
            )
        return (
            f"tensor {label} is a full copy of {module}, which {NO_ENGINE} loads per tenant, saved by "
            "save_pretrained(save_embedding_layers=True, or 'auto', the default, when an embedding is a "
            "target); save the adapter again with save_embedding_layers=False"
        )
    if path.endswith(".bias"):
        return (
            f"tensor {label} is a trained bias of the base layer (bias={reading.bias!r}), which {NO_ENGINE} "
            "serves per tenant; train with bias='none'"
        )
    return f"unexpected tensor {label} (only lora_A / lora_B weights are served)"


def _check_support(reading: LoraReading, support: AdapterSupport) -> None:
    """What this engine cannot serve of an adapter whose config and weights are otherwise sound."""
    if reading.bias != "none" and not support.bias_setting_without_biases:
        raise AdapterError(
            f"bias={reading.bias!r} is refused by {support.by}, although the weights hold no bias (the "
            f'base has none); set "bias": "none" in {CONFIG_FILE}, which changes nothing the adapter computes'
        )


def _digest(config_bytes: bytes, weights: BinaryIO, before: os.stat_result, name: str = WEIGHTS_FILE) -> str:
    """SHA-256 of config and weights, read from the file already checked: the same bytes, or a refusal."""
    digest = hashlib.sha256(config_bytes)
    weights.seek(0)
    read = 0
    while chunk := weights.read(1 << 20):
        digest.update(chunk)
        read += len(chunk)
    after = os.fstat(weights.fileno())
    if read != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise AdapterError(f"{name} changed while being read")
    return digest.hexdigest()
