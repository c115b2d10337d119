"""A PEFT LoRA adapter as a GGUF LoRA, which llama.cpp loads beside a base GGUF.

The format is that of llama.cpp's `convert_lora_to_gguf.py`: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and for each adapted weight `<gguf name>.lora_a` (PEFT's
lora_A, rank x in) and `<gguf name>.lora_b` (PEFT's lora_B, out x rank, its rows in GGUF order:
permuted for q/k, see layout.py). llama.cpp scales each pair by alpha / its own rank, as PEFT does;
an rsLoRA adapter (alpha / sqrt(rank)) is written with alpha * sqrt(rank), which scales the same.
A module whose rank or alpha differs (rank_pattern, alpha_pattern) gets the rest of PEFT's scale
folded into its lora_b, so every module is scaled as PEFT scales it.

A conversion is cached under a name made of the adapter's bytes, the base GGUF's layout and shapes
and this converter's version: each version is converted once, and never reused against another base.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..adapters import peftconfig
from ..adapters.drops import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE
from ..errors import AdapterError, ConversionError
from .atomic import atomic_path
from .layout import Layout, gguf_metadata

# Part of every cache name: bump it when the files this module writes change.
CONVERTER_VERSION = "lorabox-lora-1"


@dataclass(frozen=True)
class BaseGGUF:
    """What converting an adapter needs to know of the base GGUF it will be loaded with."""

    path: Path
    layout: Layout
    shapes: dict[str, tuple[int, ...]]  # GGUF tensor name → shape, innermost dimension first

    @classmethod
    def read(cls, path: Path) -> BaseGGUF:
        fields, shapes = gguf_metadata(path)
        return cls(path, Layout.from_gguf_fields(fields), shapes)

    @property
    def signature(self) -> str:
        layout = self.layout
        described = [
            layout.arch,
            layout.block_count,
            layout.n_head,
            layout.n_head_kv,
            sorted(self.shapes.items()),
        ]
        return hashlib.sha256(json.dumps(described).encode()).hexdigest()


@dataclass(frozen=True)
class PeftLora:
    """An adapter's A/B pairs by module path (`model.layers.0.self_attn.q_proj`), as float32, with
    the scale PEFT gives each module (rank_pattern, alpha_pattern and rsLoRA applied)."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    scales: dict[str, float]  # module path → what PEFT multiplies B @ A by
    alpha: float
    """The adapter's alpha as llama.cpp reads it: it scales each tensor pair by alpha / its rank,
    which is PEFT's scale for plain LoRA; rsLoRA's alpha is written times sqrt(rank)."""

    @classmethod
    def load(cls, folder: Path) -> PeftLora:
        import torch
        from safetensors.torch import load_file

        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_file(folder / WEIGHTS_FILE)
        except Exception as exc:  # safetensors, JSON and OS errors all mean "not readable"
            raise AdapterError(f"cannot read the adapter for conversion: {exc}") from exc
        if not isinstance(config, dict):
            raise AdapterError(f"{CONFIG_FILE} must be a JSON object")
        parts: dict[str, dict[str, np.ndarray]] = {}
        for name, tensor in tensors.items():
            module, _, kind = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            parts.setdefault(module, {})[kind] = tensor.to(torch.float32).numpy()
        pairs = {}
        for module, kinds in parts.items():
            if set(kinds) != {"A.weight", "B.weight"}:
                raise AdapterError(f"lora_A/lora_B pairs incomplete for {module}")
            lora_a, lora_b = kinds["A.weight"], kinds["B.weight"]
            if not (np.isfinite(lora_a).all() and np.isfinite(lora_b).all()):
                raise AdapterError(f"the weights of {module} are not all finite numbers")
            pairs[module] = (lora_a, lora_b)
        # The config read as the drop check read it, against the modules these weights adapt.
        shapes = {module: (b.shape[0], a.shape[1]) for module, (a, b) in pairs.items()}
        reading = peftconfig.read(config, _AdaptedModules(shapes), max_rank=1 << 30)
        unselected = sorted(set(pairs) - set(reading.modules))
        if unselected:
            raise AdapterError(f"{unselected[0]} has weights but target_modules does not select it")
        alpha = reading.alpha * (math.sqrt(reading.rank) if reading.use_rslora else 1.0)
        return cls(pairs, {m: reading.modules[m].scale for m in pairs}, alpha)

    def delta(self, module: str) -> np.ndarray | None:
        """What merging adds to the module's weight: scale * B @ A (out x in); None if not adapted."""
        pair = self.pairs.get(module)
        return None if pair is None else self.scales[module] * (pair[1] @ pair[0])

    def lora_b_for_gguf(self, module: str) -> np.ndarray:
        """The module's lora_B with what llama.cpp's alpha / rank leaves out of PEFT's scale folded
        in: a per-module rank or alpha (rank_pattern, alpha_pattern) becomes part of the weights."""
        lora_a, lora_b = self.pairs[module]
        factor = self.scales[module] / (self.alpha / lora_a.shape[0])
        return lora_b if math.isclose(factor, 1.0, rel_tol=1e-9) else lora_b * np.float32(factor)


@dataclass(frozen=True)
class _AdaptedModules:
    """The modules an adapter's weights adapt, as the base PEFT matches its config against."""

    linear_shapes: dict[str, tuple[int, int]]
    embeddings: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self.linear_shapes)


def write_lora(lora: PeftLora, base: BaseGGUF, out: Path) -> Path:

    layout = base.layout
    writer = gguf.GGUFWriter(path=None, arch=layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
    for module, (lora_a, lora_b) in sorted(lora.pairs.items()):
        name = layout.gguf_name(f"{module}.weight")
        if name is None or name not in base.shapes:
            raise AdapterError(f"{module} has no weight in the base GGUF ({base.path.name}) to adapt")
        expected = base.shapes[name][:2]  # (in, out)
        if (lora_a.shape[1], lora_b.shape[0]) != expected:
            raise AdapterError(
                f"{module} adapts a {lora_b.shape[0]}x{lora_a.shape[1]} weight, but the base GGUF's "
                f"{name} is {expected[1]}x{expected[0]}"
            )
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a))
        lora_b = lora.lora_b_for_gguf(module)
        writer.add_tensor(
            f"{name}.lora_b", np.ascontiguousarray(layout.rows_for_gguf(f"{module}.weight", lora_b))
        )
    with atomic_path(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def cached_lora(folder: Path, base: BaseGGUF, cache_dir: Path) -> Path:
    """The GGUF LoRA for the PEFT adapter in `folder`, converted now unless already cached.

    Blocking (reads and hashes the weights): call it off the event loop. Raises AdapterError."""
    digest = hashlib.sha256(f"{CONVERTER_VERSION}\0{base.signature}\0".encode())
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with (folder / name).open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    except OSError as exc:
        raise AdapterError(f"cannot read the adapter for conversion: {exc}") from exc
    out = cache_dir / f"lora-{digest.hexdigest()[:40]}.gguf"
    if out.exists():
        return out
    try:
        return write_lora(PeftLora.load(folder), base, out)
    except ConversionError as exc:
        raise AdapterError(str(exc)) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterError(f"cannot convert the adapter to GGUF: {exc}") from exc
