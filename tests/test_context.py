"""max_model_len follows the model: its own context length by default (capped by the memory its KV
cache may use), and a value above it refused before any engine work, naming where it was set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.config import context
from appliance.config.context import fit_context, kv_bytes_per_token, model_context_length
from appliance.config.settings import Settings, load_config
from appliance.demo.build import DEMO_DATA_DIR
from appliance.errors import ConfigError
from appliance.ops.cli import EXIT_CONFIG
from appliance.testing.localserver import free_port
from tests.conftest import serve_refused

DEMO_MODEL = DEMO_DATA_DIR / "model"
GIB = 1 << 30


def model(folder: Path, config: dict[str, object], tokenizer: dict[str, object] | None = None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


LLAMA_8B = {  # Llama-3.1-8B's shape: 128 KiB of f16 KV cache a token
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
    "torch_dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.telemetry.gpu.gpu_memory", lambda: None)


def test_the_default_is_the_models_own_length():
    assert Settings().max_model_len == 0
    assert model_context_length(DEMO_MODEL).tokens == 1024
    assert fit_context(Settings(), DEMO_MODEL).max_model_len == 1024
    assert fit_context(Settings(max_model_len=512), DEMO_MODEL).max_model_len == 512  # less: as set


def test_more_than_the_model_has_is_refused_naming_the_file_and_the_value_that_works(tmp_path: Path):
    path = tmp_path / "lorabox.toml"
    path.write_text("max_model_len = 4096\n")
    with pytest.raises(ConfigError) as refused:
        fit_context(load_config(path, env={}), DEMO_MODEL)
    assert str(refused.value) == (
        f"{path}: max_model_len: 4096 is more than the model's context length, 1024 (max_position_embeddings "
        f"in {DEMO_MODEL / 'config.json'}): set max_model_len = 1024 or less, or 0 (the default: the model's "
        "own, capped by memory)"
    )


def test_an_environment_value_is_named_as_such(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORABOX_MAX_MODEL_LEN", "2048")
    with pytest.raises(
        ConfigError, match=r"^LORABOX_MAX_MODEL_LEN \(environment\): max_model_len: 2048 is more"
    ):
        fit_context(load_config(env=dict(os.environ)), DEMO_MODEL)


def test_the_length_is_read_as_vllm_derives_it(tmp_path: Path):
    # The smallest of the length keys; the tokenizer's limit if lower; RoPE scaling where the
    # config gives the unscaled length.
    def length(
        name: str, config: dict[str, object], tokenizer: dict[str, object] | None = None
    ) -> int | None:
        found = model_context_length(model(tmp_path / name, config, tokenizer))
        return None if found is None else found.tokens

    assert length("keys", {"n_positions": 2048, "max_position_embeddings": 4096}) == 2048
    assert length("tokenizer", {"max_position_embeddings": 4096}, {"model_max_length": 1000}) == 1000
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert length("linear", linear) == 8192
    assert length("llama3", LLAMA_8B) == 131072  # llama3 RoPE: the config's length is already scaled
    assert length("multimodal", {"text_config": {"max_position_embeddings": 32768}}) == 32768
    assert length("unknown", {"hidden_size": 64}) is None
    assert fit_context(Settings(max_model_len=99999), tmp_path / "unknown").max_model_len == 99999  # as set


def test_the_default_is_capped_so_that_one_sequence_fits_in_the_kv_cache(tmp_path: Path):
    folder = model(tmp_path / "llama", LLAMA_8B)
    assert kv_bytes_per_token(folder, "auto") == 128 << 10
    # 4 GiB of KV cache on a CPU box hold 32768 tokens of an 8B model, not its 131072.
    assert fit_context(Settings(cpu_kv_cache_gib=4), folder).max_model_len == 32768
    assert fit_context(Settings(cpu_kv_cache_gib=32), folder).max_model_len == 131072
    assert kv_bytes_per_token(folder, "float32") == 256 << 10


def test_on_a_gpu_the_cap_is_the_vram_vllm_may_use_less_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from appliance.telemetry.gpu import GpuMemory

    folder = model(tmp_path / "llama", LLAMA_8B)
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setattr("appliance.telemetry.gpu.gpu_memory", lambda: GpuMemory(24 * GIB, 0, 24 * GIB))
    budget, said = context.kv_budget_bytes(Settings(gpu_memory_utilization=0.5), folder)
    assert budget == 12 * GIB - 1000
    assert said.startswith("gpu_memory_utilization = 0.5 of 24.0 GiB")
    assert (
        fit_context(Settings(gpu_memory_utilization=0.5), folder).max_model_len == 98288
    )  # a multiple of 16


def test_lorabox_serve_refuses_it_in_one_line_before_any_engine_work(tmp_path: Path):
    """What the journal shows, and systemd does not restart (exit status 78)."""
    path = tmp_path / "lorabox.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\nadapters_dir = "{tmp_path}"\nport = {free_port()}\n'
        "max_model_len = 4096\n"
    )
    result = serve_refused(path, timeout_s=120)
    assert result.stdout == f"{EXIT_CONFIG} []\n", result.stderr
    assert result.stderr.startswith(
        f"lorabox: {path}: max_model_len: 4096 is more than the model's context length, 1024"
    )
    assert len(result.stderr.splitlines()) == 1, result.stderr
