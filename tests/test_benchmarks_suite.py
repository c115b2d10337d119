"""The parts of benchmarks/ that decide what a benchmark measures: the order daemons are measured in,
the box served with --model, the residency replay, and the GPU script's use of install.sh."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from appliance.adapters.drops import BaseModelInfo
from appliance.adapters.safetensors_header import read_header
from appliance.config.settings import load_config
from appliance.demo.build import DEMO_TENANTS
from benchmarks.scale import zipf_hits
from benchmarks.suite import box
from benchmarks.suite.fleet import schedule
from tests.conftest import Demo

REPO = Path(__file__).resolve().parent.parent


def test_side_by_side_rounds_alternate_and_one_at_a_time_keeps_each_daemon_together():
    phases = ["defaults", "fifo", "chat plain"]
    on = {"defaults": "defaults", "fifo": "fifo", "chat plain": "defaults"}.__getitem__
    assert schedule(phases, 2, on, one_at_a_time=False) == [
        (0, "defaults"),
        (0, "fifo"),
        (0, "chat plain"),
        (1, "chat plain"),
        (1, "fifo"),
        (1, "defaults"),
    ]
    # Every round of one daemon's phases before the next daemon is started.
    assert schedule(phases, 2, on, one_at_a_time=True) == [
        (0, "defaults"),
        (0, "chat plain"),
        (1, "chat plain"),
        (1, "defaults"),
        (0, "fifo"),
        (1, "fifo"),
    ]


def test_zipf_replay_misses_only_first_requests_when_every_tenant_has_a_slot():
    slot, host = zipf_hits(tenants=20, slots=20, host=36, requests=5000)
    assert slot == host == 1 - 20 / 5000  # each tenant's first request, nothing else
    fewer, host = zipf_hits(tenants=20, slots=8, host=36, requests=5000)
    assert fewer < 0.9  # slots evicted...
    assert host == 1 - 20 / 5000  # ...host memory still holds every adapter


def test_box_with_model_serves_it_to_the_demo_tenants_with_adapters_of_its_shapes(demo: Demo, tmp_path):
    folder = tmp_path / "box"
    shutil.copytree(demo.dir, folder, ignore=shutil.ignore_patterns("state", "lorabox.toml", "keys.json"))
    model = tmp_path / "real-model"  # stands for a real model: another folder, shapes of its own
    shutil.copytree(demo.model_dir, model)
    weights = load_file(model / "model.safetensors")
    save_file(
        {name: torch.zeros([2 * n for n in t.shape]) for name, t in weights.items()},
        model / "model.safetensors",
    )
    args = argparse.Namespace(model=model, dtype="bfloat16", max_model_len=2048)
    keys = box.build(folder, args)

    settings = load_config(folder / "lorabox.toml")
    assert (Path(settings.model), settings.dtype, settings.max_model_len) == (model, "bfloat16", 2048)
    assert settings.gguf_model is None  # no GGUF of a real model: vLLM only
    assert sorted(keys) == sorted(t.name for t in DEMO_TENANTS)
    assert box.model_dir(folder, args) == model
    shapes = BaseModelInfo.from_model_dir(model).linear_shapes
    for tenant in DEMO_TENANTS:
        adapter = folder / "adapters" / tenant.name / "v1"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["r"], sorted(config["target_modules"])) == (tenant.rank, sorted(tenant.target_modules))
        for name, info in read_header(adapter / "adapter_model.safetensors").items():
            module = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            out_features, in_features = shapes[module]
            expected = (tenant.rank, in_features) if ".lora_A." in name else (out_features, tenant.rank)
            assert tuple(info.shape) == expected


def test_install_sh_sourced_for_its_functions_runs_nothing():
    """gpu_check.sh takes install.sh's llama.cpp flavour and flags from install.sh itself."""
    script = 'LORABOX_INSTALL_FUNCTIONS=1 . ./install.sh && llamacpp_flavour && echo "$LLAMACPP_CMAKE_ARGS"'
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert "-DLLAVA_BUILD=off" in result.stdout
    # Its one line; main() (an install) would say far more.
    assert [line[:15] for line in result.stderr.splitlines()] == [">>> llama.cpp: "]


def test_gpu_check_script_is_shellcheck_clean():
    result = subprocess.run(
        ["shellcheck", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
