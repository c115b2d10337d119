"""max_model_len against the model: its own context length by default, capped by memory; more refused.

The engines refuse a context longer than the model's own (vLLM: "User-specified max_model_len is
greater than the derived max_model_len"; llama.cpp serves it but warns that it exceeds what the
model was trained on), so a fixed default fits some models and breaks others. Here, before any
engine work, `fit_context` reads the model's length the way vLLM derives it (config.json's length
keys, the tokenizer's `model_max_length`, RoPE scaling) and

- `max_model_len = 0` (the default) becomes that length, capped so that one sequence's KV cache fits
  in what the engine may use for it (`cpu_kv_cache_gib` on a CPU box; on a GPU, the VRAM vLLM may
  use less the weights): an 8B model's 128k context wants 16 GiB of KV cache per sequence;
- a value above the model's length is a configuration error, named with where it came from and the
  value that works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .settings import Settings, setting_origin

log = logging.getLogger(__name__)

# vLLM's keys for the length, all considered, the smallest wins (transformers_utils/
# model_arch_config_convertor.py); `model_max_length` wins outright where config.json has it.
LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose max_position_embeddings is already the scaled length (vLLM config/model.py).
SCALED_ROPE_TYPES = {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
GIB = 1 << 30


@dataclass(frozen=True)
class ContextLength:
    tokens: int
    source: str
    """What says so, for messages: `max_position_embeddings in /models/x/config.json`."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal model's language part holds the lengths and the attention shape."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def model_context_length(model_dir: Path) -> ContextLength | None:
    """The model's own context length as vLLM derives it; None when its files do not say."""
    config_path = model_dir / "config.json"
    config = _text_config(_read_json(config_path))
    found = [(config[key], key) for key in LENGTH_KEYS if isinstance(config.get(key), int | float)]
    if isinstance(config.get("model_max_length"), int | float):
        tokens, key = config["model_max_length"], "model_max_length"
    elif found:
        tokens, key = min(found)
    else:
        return None
    source = f"{key} in {config_path}"
    tokenizer_path = model_dir / "tokenizer_config.json"
    limit = _read_json(tokenizer_path).get("model_max_length")
    if isinstance(limit, int | float) and limit < tokens:
        tokens, source = limit, f"model_max_length in {tokenizer_path}"
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(rope, dict):
        kind = rope.get("rope_type") or rope.get("type") or "default"
        factor = rope.get("factor")
        if kind not in SCALED_ROPE_TYPES and isinstance(factor, int | float) and factor > 1:
            tokens, source = tokens * factor, f"{source}, times its RoPE scaling factor {factor:g}"
    return ContextLength(int(tokens), source)


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int | None:
    """KV cache bytes one token takes (keys and values, every layer); None when the config does
    not say. fp32 where the settings or the model's own dtype say so, else 2 bytes a value."""
    config = _text_config(_read_json(model_dir / "config.json"))
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    model_dtype = config.get("torch_dtype") or config.get("dtype")
    fp32 = dtype == "float32" or (dtype == "auto" and model_dtype == "float32")
    return 2 * layers * kv_heads * head_dim * (4 if fp32 else 2)


def kv_budget_bytes(settings: Settings, model_dir: Path) -> tuple[int, str]:
    """What the engine may use for KV cache, and which settings say so."""
    from ..telemetry.gpu import gpu_memory

    memory = gpu_memory()
    if memory is None:
        return settings.cpu_kv_cache_gib * GIB, f"cpu_kv_cache_gib = {settings.cpu_kv_cache_gib}"
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    usable = memory.total * settings.gpu_memory_utilization * settings.tensor_parallel_size - weights
    return max(int(usable), 0), (
        f"gpu_memory_utilization = {settings.gpu_memory_utilization} of {memory.total / GIB:.1f} GiB "
        f"less {weights / GIB:.1f} GiB of weights"
    )


def fit_context(settings: Settings, model_dir: Path) -> Settings:
    """Settings whose max_model_len fits the model: 0 resolved, too long refused (ConfigError)."""
    own = model_context_length(model_dir)
    wanted = settings.max_model_len
    if own is None:
        if wanted == 0:
            log.info("max_model_len: %s does not say its context length; the engine decides", model_dir)
        return settings
    if wanted > own.tokens:
        raise ConfigError(
            f"{setting_origin(settings, 'max_model_len')}: max_model_len: {wanted} is more than the "
            f"model's context length, {own.tokens} ({own.source}): set max_model_len = {own.tokens} "
            "or less, or 0 (the default: the model's own, capped by memory)"
        )
    if wanted:
        return settings
    length = own.tokens
    per_token = kv_bytes_per_token(model_dir, settings.dtype)
    if per_token:
        budget, said_by = kv_budget_bytes(settings, model_dir)
        fits = budget // per_token
        if fits < length:
            # vLLM's block size; and never nothing, so that the engine's own refusal names memory.
            length = max(16, fits // 16 * 16)
            log.warning(
                "max_model_len: %d, not the model's %d: one sequence's KV cache (%.1f MiB a 1,000 tokens) "
                "must fit in %.1f GiB (%s)",
                length,
                own.tokens,
                per_token * 1000 / (1 << 20),
                budget / GIB,
                said_by,
            )
    log.info("max_model_len: %d (%s)", length, own.source if length == own.tokens else "capped by memory")
    return dataclasses.replace(settings, max_model_len=length)
