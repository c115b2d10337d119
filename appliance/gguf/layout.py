"""Where a Hugging Face tensor goes in a GGUF file, and how its rows are laid out there.

llama.cpp's `llama` architecture rotates adjacent pairs of each head's dimensions; Hugging Face
Llama rotates the first half of a head against the second. llama.cpp's own converter
(`convert_hf_to_gguf.py`, `LlamaModel.permute`) therefore reorders the rows of q_proj and k_proj
within every head, and every tensor that produces those rows must follow the same order: the base
weights, a LoRA's lora_b on q/k (lora_a acts on the input, whose layout does not change), and a
merged weight. This module is that one rule, shared by model and LoRA conversion and by export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ConversionError

# Hugging Face architectures lorabox converts itself, and the GGUF architecture each becomes.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
# GGUF architectures whose q/k rows llama.cpp's converter permutes (rope "normal", not NeoX).
ROTARY_PERMUTED = frozenset({"llama"})


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{model_dir}: cannot read config.json ({exc})") from exc
    return config


@dataclass(frozen=True)
class Layout:
    arch: str  # GGUF architecture name, e.g. "llama"
    block_count: int
    n_head: int
    n_head_kv: int
    _names: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> Layout:
        names = config.get("architectures") or []
        arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), None)
        if arch is None:
            raise ConversionError(
                f"lorabox converts only Llama-family models to GGUF ({', '.join(HF_ARCHITECTURES)}), "
                f"not {', '.join(names) or 'an unnamed architecture'}; convert it with llama.cpp's "
                "convert_hf_to_gguf.py and set gguf_model to the file"
            )
        n_head = int(config["num_attention_heads"])
        return cls.build(arch, int(config["num_hidden_layers"]), n_head, config.get("num_key_value_heads"))

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Layout:
        """From a GGUF file's key/value metadata (see `gguf_metadata`)."""
        arch = str(fields.get("general.architecture", ""))
        try:
            n_head = int(fields[f"{arch}.attention.head_count"])
            blocks = int(fields[f"{arch}.block_count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"GGUF file lacks {exc} for architecture {arch!r}") from exc
        return cls.build(arch, blocks, n_head, fields.get(f"{arch}.attention.head_count_kv"))

    @classmethod
    def build(cls, arch: str, block_count: int, n_head: int, n_head_kv: Any) -> Layout:

        by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
        if arch not in by_name:
            raise ConversionError(f"unknown GGUF architecture {arch!r}")
        names = gguf.get_tensor_name_map(by_name[arch], block_count)
        kv = int(n_head_kv) if n_head_kv else n_head
        return cls(arch, block_count, n_head, kv, names)

    def gguf_name(self, hf_name: str) -> str | None:
        """`model.layers.0.self_attn.q_proj.weight` → `blk.0.attn_q.weight`; None when unknown."""
        name: str | None = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return name

    def rows_for_gguf(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """The rows (first axis) of a q/k projection, or of a tensor producing them, in GGUF order."""
        if self.arch not in ROTARY_PERMUTED:
            return rows
        if ".q_proj." in hf_name:
            return _permute(rows, self.n_head)
        if ".k_proj." in hf_name:
            return _permute(rows, self.n_head_kv)
        return rows


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: within each head, interleave the two rotary halves."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_metadata(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A GGUF file's scalar metadata and its tensors' shapes (GGML order: innermost first)."""

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable GGUF file ({exc})") from exc
    fields: dict[str, Any] = {}
    for key, value in reader.fields.items():
        if len(value.types) == 1:  # scalars and strings; token lists are not needed here
            fields[key] = value.contents()
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    return fields, shapes
