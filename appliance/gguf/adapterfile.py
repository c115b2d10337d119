"""A LoRA already converted by llama.cpp's own tools (convert_lora_to_gguf.py), dropped as
`<version>/adapter_model.gguf` instead of a PEFT folder: checked against the base model as a PEFT
drop is (every adapted weight exists, shapes fit, ranks within max_lora_rank), then loaded by the
llama.cpp engine as it is. vLLM reads PEFT folders only and refuses these at registration.

The file's header is bounded before the `gguf` reader walks it: a dropped file may declare
billions of keys or tensors, and each is a step of Python.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError

GGUF_FILE = "adapter_model.gguf"
GGUF_MAGIC = b"GGUF"
MAX_TENSORS = 8192  # two per adapted weight: all seven projections of 500 layers
MAX_KEYS = 1024


@dataclass(frozen=True)
class GGUFLora:
    """What a GGUF LoRA adapts: GGUF weight name (blk.0.attn_q.weight) → (in, out, rank)."""

    architecture: str
    alpha: float
    weights: dict[str, tuple[int, int, int]]


def dropped_gguf(folder: Path) -> Path | None:
    """The GGUF LoRA of a version folder dropped as one, else None (a PEFT folder)."""
    path = folder / GGUF_FILE
    return path if path.is_file() and not (folder / "adapter_model.safetensors").exists() else None


def read_gguf_lora(path: str, head: bytes) -> GGUFLora:
    """Read the GGUF LoRA at `path`, whose first 24 bytes are `head`; raises AdapterError."""
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise AdapterError(f"{GGUF_FILE} is not a GGUF file")
    tensors, keys = struct.unpack("<QQ", head[8:24])
    if tensors > MAX_TENSORS or keys > MAX_KEYS:
        raise AdapterError(
            f"{GGUF_FILE} declares {tensors} tensors and {keys} keys; a LoRA has at most "
            f"{MAX_TENSORS} and {MAX_KEYS}"
        )
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if len(f.types) == 1}
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    except Exception as exc:  # the reader raises ValueError, IndexError, struct and numpy errors
        raise AdapterError(f"{GGUF_FILE} is not a readable GGUF file ({type(exc).__name__})") from exc
    if (fields.get("general.type"), fields.get("adapter.type")) != ("adapter", "lora"):
        raise AdapterError(
            f"{GGUF_FILE} is not a LoRA adapter (general.type must be adapter, adapter.type lora)"
        )
    alpha = fields.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, int | float):
        raise AdapterError(f"{GGUF_FILE}: adapter.lora.alpha is not a number")
    return GGUFLora(str(fields.get("general.architecture", "")), float(alpha), _pairs(shapes))


def _pairs(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int, int]]:
    """Weight name → (in, out, rank) from its lora_a (in x rank) and lora_b (rank x out) tensors."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        weight, _, kind = name.rpartition(".lora_")
        if kind not in ("a", "b") or len(shape) != 2:
            raise AdapterError(f"unexpected tensor {_short(name)} in {GGUF_FILE} (only .lora_a / .lora_b)")
        parts.setdefault(weight, {})[kind] = shape
    pairs = {}
    for weight, kinds in parts.items():
        if set(kinds) != {"a", "b"}:
            raise AdapterError(f"lora_a/lora_b pairs incomplete for {_short(weight)} in {GGUF_FILE}")
        (in_features, rank), (rank_b, out_features) = kinds["a"], kinds["b"]
        if rank != rank_b:
            raise AdapterError(f"{_short(weight)}: lora_a has rank {rank}, lora_b {rank_b}")
        pairs[weight] = (in_features, out_features, rank)
    if not pairs:
        raise AdapterError(f"{GGUF_FILE} holds no tensors")
    return pairs


def check_against(lora: GGUFLora, architecture: str, modules: dict[str, tuple[str, tuple[int, int]]]) -> None:
    """Every weight the LoRA adapts exists in the base with the shapes it expects.

    `modules`: the base's GGUF weight name → (HF module path, (out_features, in_features))."""
    if not modules:
        raise AdapterError(
            "lorabox cannot check a GGUF LoRA against this base model's architecture; drop the PEFT adapter"
        )
    if lora.architecture != architecture:
        raise AdapterError(
            f"{GGUF_FILE} is for architecture {lora.architecture!r}; the base is {architecture!r}"
        )
    for weight, (in_features, out_features, _) in sorted(lora.weights.items()):
        if weight not in modules:
            raise AdapterError(f"{GGUF_FILE} adapts {_short(weight)}, which the base model does not have")
        module, expected = modules[weight]
        if (out_features, in_features) != expected:
            raise AdapterError(
                f"{GGUF_FILE} adapts {weight} ({module}) as {out_features}x{in_features}; the base's is "
                f"{expected[0]}x{expected[1]}"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:160] + "…"
