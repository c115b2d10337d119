"""One tenant's model as a single GGUF file that llama.cpp or Ollama runs on its own.

The tenant's adapter is merged into the base weights (W + alpha/r * B @ A, in float32), the result is
written as GGUF, and quantised types are made from an f32 file by llama.cpp's own quantiser
(`llama_model_quantize`), never by lorabox. An Ollama Modelfile with the chat template is written
beside it. Blocking and CPU-heavy: callers run it off the event loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError, ConversionError, StoreError
from ..names import natural_key
from ..tenancy.store import AdapterVersion, Store
from . import EXPORT_QUANTS
from .atomic import atomic_path
from .lora import PeftLora
from .model import write_model
from .ollama import write_modelfile

FLOAT_QUANTS = ("f32", "f16")  # written by lorabox itself
LLAMA_QUANTS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
EXPORT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.gguf")
EXPORT_MODE = 0o640  # the service and its group (the operators); no one else


@dataclass(frozen=True)
class ExportResult:
    path: Path
    modelfile: Path
    quant: str
    size_bytes: int
    sha256: str


def check_export_name(name: object) -> str:
    """A file name for the exports directory (never a path); ValueError says what is wrong."""
    if not isinstance(name, str) or EXPORT_NAME_RE.fullmatch(name) is None:
        raise ValueError(
            "must be a file name ending in .gguf (letters, digits, '.', '_', '-'; no folders), "
            f"not {str(name)[:80]!r}"
        )
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def quantize(source: Path, out: Path, quant: str) -> None:
    """`source` (a float GGUF) quantised by llama.cpp into `out`, atomically."""
    try:
        from llama_cpp import llama_cpp as lib
    except ImportError as exc:
        raise ConversionError(
            f"--quant {quant} uses llama.cpp's quantiser: install the `llamacpp` extra, or export f16"
        ) from exc
    import llama_cpp

    llama_cpp._logger.set_verbose(False)  # type: ignore[attr-defined]  # a line per tensor otherwise
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, LLAMA_QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    with atomic_path(out) as tmp:
        if lib.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise ConversionError(f"llama.cpp could not quantise the model to {quant}")


def export_merged(model_dir: Path, adapter_dir: Path, out: Path, quant: str, name: str) -> ExportResult:
    """Write `out` (and `<out stem>.Modelfile`): the base model with the adapter merged in."""
    from transformers import AutoTokenizer

    if quant not in EXPORT_QUANTS:
        raise ConversionError(f"quant must be one of {', '.join(EXPORT_QUANTS)}, not {quant!r}")
    if out.suffix != ".gguf":
        raise ConversionError(f"the output file must end in .gguf, not {out.name!r}")
    lora = PeftLora.load(adapter_dir)
    merged: set[str] = set()

    def merge(hf_name: str, weight: np.ndarray) -> np.ndarray:
        delta = lora.delta(hf_name.removesuffix(".weight"))
        if delta is None:
            return weight
        merged.add(hf_name.removesuffix(".weight"))
        return weight + delta

    if quant in FLOAT_QUANTS:
        write_model(model_dir, out, quant, name=name, transform=merge)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".lorabox-export-") as scratch:
            full = write_model(
                model_dir, Path(scratch) / "merged-f32.gguf", "f32", name=name, transform=merge
            )
            quantize(full, out, quant)
    missing = sorted(set(lora.pairs) - merged)
    if missing:
        out.unlink(missing_ok=True)
        raise AdapterError(f"the base model has no {missing[0]} for the adapter to merge into")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    modelfile = write_modelfile(out, tokenizer, f"{name}, exported by lorabox ({quant})")
    return ExportResult(out, modelfile, quant, out.stat().st_size, _sha256(out))


def tenant_adapter(store: Store, tenant: str, version: str | None) -> AdapterVersion:
    """The version to export: the one named, else the tenant's active one, else its newest servable."""
    if version is None:
        version = store.route(tenant).active_version
    if version is None:
        ready = [a.version for a in store.adapters(tenant) if a.state == "ready"]
        version = max(ready, key=natural_key, default=None)
    adapter = store.get_adapter(tenant, version) if version else None
    if adapter is None or adapter.state != "ready":
        named = f"{tenant}@{version}" if version else f"tenant {tenant!r}"
        raise StoreError(f"{named} has no servable adapter to export (see `lorabox adapters list`)")
    return adapter


class ExportRefused(StoreError):
    """The file is there already (and overwriting was not asked for), or is not a plain file."""


@dataclass(frozen=True)
class Exporter:
    """Exports of this box's tenants: its base model, and the exports directory the daemon writes
    into (the only place: the admin API takes a file name, never a path)."""

    model_dir: Path
    exports_dir: Path

    @staticmethod
    def default_name(adapter: AdapterVersion, quant: str) -> str:
        return f"{adapter.tenant}-{adapter.version}-{quant}.gguf"

    def run(self, adapter: AdapterVersion, quant: str, out: Path) -> ExportResult:
        """To `out`, anywhere its caller may write (the CLI, with the operator's own rights)."""
        return export_merged(
            self.model_dir, Path(adapter.path), out, quant, f"{adapter.tenant}-{adapter.version}"
        )

    def into_exports(
        self, adapter: AdapterVersion, quant: str, name: str, *, overwrite: bool = False
    ) -> ExportResult:
        """`<exports_dir>/<name>` and its Modelfile, mode 0640. Written in a private folder there,
        then renamed into place: a name that is a symbolic link is never followed (a rename
        replaces the link itself, and a link is refused anyway), and an existing file is kept
        unless `overwrite`."""
        check_export_name(name)
        self.exports_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        final = self.exports_dir / name
        modelfile = final.with_suffix(".Modelfile")
        for path in (final, modelfile):
            self._check_target(path, overwrite)
        scratch = Path(tempfile.mkdtemp(dir=self.exports_dir, prefix=".lorabox-export-"))
        try:
            result = export_merged(
                self.model_dir,
                Path(adapter.path),
                scratch / name,
                quant,
                f"{adapter.tenant}-{adapter.version}",
            )
            for path in (result.path, result.modelfile):
                os.chmod(path, EXPORT_MODE)
            for path in (final, modelfile):  # checked again: the export took a while
                self._check_target(path, overwrite)
            os.replace(result.modelfile, modelfile)
            os.replace(result.path, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return ExportResult(final, modelfile, quant, result.size_bytes, result.sha256)

    @staticmethod
    def _check_target(path: Path, overwrite: bool) -> None:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise ExportRefused(f"{path} exists and is not a plain file (a link?): not replaced")
        if not overwrite:
            raise ExportRefused(f"{path} exists; ask to overwrite it (overwrite: true), or give another name")
