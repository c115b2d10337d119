"""A Hugging Face Llama-family model as one GGUF file (f32 or f16), optionally with an adapter merged in.

Tensors are streamed one at a time from the safetensors shards into the file, so converting a
large model needs memory for one tensor, not for the model. The file appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ConversionError
from .atomic import atomic_path
from .layout import Layout, read_hf_config
from .vocab import add_vocab

# Part of every cached model's name: bump it when the files this module writes change.
CONVERTER_VERSION = "lorabox-model-1"
# Output types lorabox writes itself; quantised types come from llama.cpp's quantiser (export.py).
FLOAT_TYPES = {"f32": np.float32, "f16": np.float16}
# Tensors in checkpoints that llama.cpp recomputes and does not load.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)

# weight name (HF) and float32 weight → the weight to write; export merges an adapter through it.
Transform = Callable[[str, np.ndarray], np.ndarray]


def float_type_for(config: dict[str, Any], dtype: str) -> str:
    """`float32` → f32; `auto` keeps a float32 checkpoint in f32; everything else → f16."""
    if dtype == "float32":
        return "f32"
    checkpoint = str(config.get("dtype") or config.get("torch_dtype") or "")
    return "f32" if dtype == "auto" and checkpoint == "float32" else "f16"


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model_dir / "model.safetensors"]


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConversionError(
            f"rope scaling {kind!r} is not converted by lorabox; convert the model with llama.cpp's "
            "convert_hf_to_gguf.py and set gguf_model"
        )
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _add_metadata(writer: Any, config: dict[str, Any], layout: Layout, float_type: str, name: str) -> None:

    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // layout.n_head)
    writer.add_name(name)
    writer.add_block_count(layout.block_count)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(layout.n_head)
    writer.add_head_count_kv(layout.n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(config["vocab_size"]))
    file_type = gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_model(
    model_dir: Path, out: Path, float_type: str = "f32", *, name: str = "", transform: Transform | None = None
) -> Path:
    """Write `model_dir` as a GGUF file at `out` (atomically); `transform` may change any weight."""
    import torch
    from safetensors import safe_open

    if float_type not in FLOAT_TYPES:
        raise ConversionError(f"GGUF float type must be one of {', '.join(FLOAT_TYPES)}, not {float_type!r}")
    config = read_hf_config(model_dir)
    layout = Layout.from_hf_config(config)
    writer = gguf.GGUFWriter(path=None, arch=layout.arch)
    _add_metadata(writer, config, layout, float_type, name or model_dir.name)
    add_vocab(writer, model_dir, int(config["vocab_size"]))

    plan: list[tuple[Path, str, np.dtype[Any]]] = []  # (shard, HF name, type written)
    for shard in _shards(model_dir):
        with safe_open(shard, framework="pt") as tensors:
            for hf_name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if hf_name.endswith(SKIPPED_SUFFIXES):
                    continue
                gguf_name = layout.gguf_name(hf_name)
                if gguf_name is None:
                    raise ConversionError(f"tensor {hf_name!r} has no place in a GGUF {layout.arch} model")
                shape = tuple(tensors.get_slice(hf_name).get_shape())
                # llama.cpp keeps norms (1-D) in f32 whatever the file type, as its converter does.
                dtype = np.dtype(np.float32 if len(shape) == 1 else FLOAT_TYPES[float_type])
                writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
                plan.append((shard, hf_name, dtype))

    with atomic_path(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for shard in dict.fromkeys(s for s, _, _ in plan):
            with safe_open(shard, framework="pt") as tensors:
                for _, hf_name, dtype in (p for p in plan if p[0] == shard):
                    weight = tensors.get_tensor(hf_name).to(torch.float32).numpy()
                    if transform is not None:
                        weight = transform(hf_name, weight)
                    writer.write_tensor_data(layout.rows_for_gguf(hf_name, weight).astype(dtype))
        writer.close()
    return out


def cached_model(model_dir: Path, cache_dir: Path, float_type: str) -> Path:
    """The model as GGUF under `cache_dir`, converted on first use. Blocking.

    The name comes from the model folder's files (names, sizes, modification times: hashing many
    GB of weights at every start would take minutes), the float type and the converter version."""
    described = [CONVERTER_VERSION, float_type]
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        stat = path.stat()
        described.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\0".join(described).encode()).hexdigest()[:40]
    out = cache_dir / f"model-{digest}-{float_type}.gguf"
    return out if out.exists() else write_model(model_dir, out, float_type)
