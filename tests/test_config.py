"""Settings: defaults, the TOML file, LORABOX_* overrides, and every way they can be wrong."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import psutil
import pytest

from appliance.config import settings as config_module
from appliance.config.settings import Settings, load_config, setting_names
from appliance.errors import ConfigError
from appliance.ops.cli import EXIT_CONFIG
from tests.conftest import serve_refused


@pytest.fixture(autouse=True)
def _no_system_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever /etc/lorabox holds on this machine, the tests never read it."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "lorabox.toml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lorabox.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_config(env={})
    assert settings == Settings()
    assert settings.source is None
    assert (settings.host, settings.port, settings.engine) == ("127.0.0.1", 8400, "auto")
    assert settings.state_dir == Path("/var/lib/lorabox")
    assert settings.adapters_dir == Path("/var/lib/lorabox/adapters")
    assert settings.max_lora_rank == 64
    assert settings.base_model_name == "lorabox-demo"


def test_every_setting_is_documented() -> None:
    source = Path(config_module.__file__).read_text()
    for name in Settings.__dataclass_fields__:
        declaration = next(line for line in source.splitlines() if line.strip().startswith(f"{name}:"))
        following = source.split(declaration, 1)[1].lstrip().splitlines()[0]
        assert following.startswith('"""'), name


def test_file_values(tmp_path: Path) -> None:
    state, drop = tmp_path / "state", tmp_path / "drop"
    path = write(
        tmp_path,
        f"""
model = "/models/llama"
engine = "vllm"
port = 9100
state_dir = "{state}"
adapters_dir = "{drop}"
gpu_memory_utilization = 0.5
max_loras = 2
max_cpu_loras = 4
""",
    )
    settings = load_config(path, env={})
    assert settings.source == path
    assert settings.model == "/models/llama"
    assert settings.engine == "vllm"
    assert settings.port == 9100
    assert settings.state_dir == state
    assert settings.adapters_dir == drop
    assert settings.gpu_memory_utilization == 0.5
    assert (settings.max_loras, settings.max_cpu_loras) == (2, 4)
    assert settings.base_model_name == "llama"
    assert settings.host == "127.0.0.1"  # untouched settings keep their defaults


def test_integer_accepted_for_a_float_setting(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, "gpu_memory_utilization = 1\n"), env={})
    assert settings.gpu_memory_utilization == 1.0
    assert isinstance(settings.gpu_memory_utilization, float)


def test_paths_expand_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", "/home/x")
    settings = load_config(write(tmp_path, 'state_dir = "~/lorabox-state"\n'), env={})
    assert settings.state_dir == Path("/home/x/lorabox-state")


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 9100\nhost = "10.0.0.2"\n')
    settings = load_config(path, env={"LORABOX_PORT": "9000", "LORABOX_MAX_LORA_RANK": "16"})
    assert settings.port == 9000
    assert settings.max_lora_rank == 16
    assert settings.host == "10.0.0.2"


def test_env_without_a_file(tmp_path: Path) -> None:
    settings = load_config(env={"LORABOX_STATE_DIR": str(tmp_path), "LORABOX_GPU_MEMORY_UTILIZATION": "0.7"})
    assert settings.state_dir == tmp_path
    assert settings.gpu_memory_utilization == 0.7
    assert settings.source is None


def test_unrelated_env_is_ignored(tmp_path: Path) -> None:
    settings = load_config(env={"PORT": "1", "LORABOX_NOT_A_SETTING": "x", "LORABOX_SOURCE": "/x"})
    assert settings == Settings()


def test_lorabox_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 9200\n")
    assert load_config(env={"LORABOX_CONFIG": str(path)}).port == 9200
    # An explicit path beats the variable.
    other = tmp_path / "other.toml"
    other.write_text("port = 9300\n")
    assert load_config(other, env={"LORABOX_CONFIG": str(path)}).port == 9300


def test_database_path_is_under_state_dir(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, f'state_dir = "{tmp_path}"\n'), env={})
    assert settings.database_path.parent == tmp_path
    assert settings.database_path.name.endswith(".db")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*prot"):
        load_config(write(tmp_path, "prot = 9000\n"), env={})


def test_source_is_not_a_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*source"):
        load_config(write(tmp_path, 'source = "/x"\n'), env={})


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server"):
        load_config(write(tmp_path, "[server]\nport = 1\n"), env={})


@pytest.mark.parametrize(
    "line",
    [
        'port = "abc"',
        "port = true",
        "max_loras = false",
        "gpu_memory_utilization = true",
        'gpu_memory_utilization = "most"',
        "host = 127",
        "engine = 1",
    ],
)
def test_wrong_types_in_the_file(tmp_path: Path, line: str) -> None:
    name = line.split(" =")[0]
    with pytest.raises(ConfigError, match=name):
        load_config(write(tmp_path, line + "\n"), env={})


@pytest.mark.parametrize(("name", "value"), [("PORT", "abc"), ("PORT", ""), ("MAX_LORAS", "2.5")])
def test_wrong_types_in_the_env(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name.lower()):
        load_config(env={f"LORABOX_{name}": value})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('engine = "tensorrt"', "engine: must be one of auto, vllm, llamacpp, not 'tensorrt'"),
        ("port = 0", "port: must be 1-65535"),
        ("port = 65536", "port: must be 1-65535"),
        ("max_request_bytes = 10", "max_request_bytes: must be between"),
        ("max_request_bytes = 4194304", "max_request_bytes: must be between 1024 and 2097152"),
        ("request_header_timeout_s = 0", "request_header_timeout_s: must be > 0"),
        ("request_body_timeout_s = -1", "request_body_timeout_s: must be > 0"),
        ("max_connections = 0", "max_connections: must be at least 1"),
        ("max_loras = -1", "max_loras: must be >= 0"),
        ("max_cpu_loras = -1", "max_cpu_loras: must be >= 0"),
        ("max_loras = 8\nmax_cpu_loras = 4", "max_cpu_loras: need max_cpu_loras >= max_loras"),
        ("lora_cpu_budget_mib = 0", "lora_cpu_budget_mib: must be at least 1"),
        ("max_lora_rank = 0", "max_lora_rank: must be 1-512"),
        ("max_lora_rank = 1024", "max_lora_rank: must be 1-512"),
        ("max_model_len = -1", "max_model_len: must be >= 0"),
        ('dtype = "fp8"', "dtype: must be one of auto, float32, bfloat16, float16"),
        ("gpu_memory_utilization = 0", "gpu_memory_utilization: must be in"),
        ("gpu_memory_utilization = 1.5", "gpu_memory_utilization: must be in"),
        ("tensor_parallel_size = 0", "tensor_parallel_size: must be at least 1"),
        ("cpu_kv_cache_gib = 0", "cpu_kv_cache_gib: must be at least 1"),
        ('log_level = "loud"', "log_level: must be one of debug"),
        ("drain_timeout_s = -1", "drain_timeout_s: must be >= 0"),
        ("engine_probe_interval_s = 0", "engine_probe_interval_s: must be > 0"),
        ("engine_probe_timeout_s = -2", "engine_probe_timeout_s: must be > 0"),
        ("engine_probe_interval_s = 20.0", "engine_probe_timeout_s: must be longer than"),
        ("start_timeout_s = 0", "start_timeout_s: must be > 0"),
        ("llamacpp_parallel = 0", "llamacpp_parallel: must be >= 1"),
        ("llamacpp_threads = -1", "llamacpp_threads: must be >= 0"),
    ],
)
def test_invalid_values_name_the_setting_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert str(refused.value) == f"{path}: {message}" or str(refused.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("name", setting_names())
def test_every_setting_refuses_a_wrong_value_by_name_and_file(tmp_path: Path, name: str) -> None:
    """A TOML table is no setting's type: each one refuses it, naming itself and the file."""
    path = write(tmp_path, f"{name} = {{ x = 1 }}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert str(refused.value).startswith(f"{path}: {name}: cannot use {{'x': 1}}")


NUMERIC = [n for n in setting_names() if get_type_hints(Settings)[n] in (int, float, bool)]


@pytest.mark.parametrize("name", NUMERIC)
def test_a_wrong_value_from_the_environment_names_its_variable(name: str) -> None:
    variable = f"LORABOX_{name.upper()}"
    with pytest.raises(ConfigError) as refused:
        load_config(env={variable: "plenty"})
    assert str(refused.value).startswith(f"{variable} (environment): {name}: cannot use 'plenty'")


def test_bad_engine_from_env() -> None:
    with pytest.raises(ConfigError, match="engine"):
        load_config(env={"LORABOX_ENGINE": "VLLM"})


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lorabox\.toml"):
        load_config(write(tmp_path, "port = \n"), env={})


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(env={"LORABOX_CONFIG": str(tmp_path / "nope.toml")})


def test_missing_system_file_means_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    system = write(tmp_path, "port = 9500\n")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", system)
    assert load_config(env={}).port == 9500
    system.unlink()
    assert load_config(env={}).port == 8400


@pytest.mark.parametrize("line", ["port = [8400]", "port = 1979-05-27", "max_loras = {a = 1}"])
def test_non_scalar_values_are_config_errors(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=line.split(" =")[0]):
        load_config(write(tmp_path, line + "\n"), env={})


@pytest.mark.parametrize("line", ["port = 80.5", "max_loras = 2.9"])
def test_int_settings_refuse_fractional_floats(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=line.split(" =")[0]):
        load_config(write(tmp_path, line + "\n"), env={})


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_unreadable_config_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "latin1.toml"
        path.write_bytes('host = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError):
        load_config(path, env={})


def test_unknown_log_level_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_level"):
        load_config(write(tmp_path, 'log_level = "loud"\n'), env={})


def test_the_daemon_refuses_a_bad_value_in_one_line_naming_it_and_the_file(tmp_path: Path) -> None:
    """What systemd's journal shows when the config is wrong: `lorabox serve` exits 1 at once."""
    path = write(tmp_path, 'port = 8400\nengine_probe_timeout_s = "soon"\n')
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(path)],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if not k.startswith("LORABOX_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (EXIT_CONFIG, "")  # not restarted by systemd
    assert result.stderr == f"lorabox: {path}: engine_probe_timeout_s: cannot use 'soon' (not a number)\n"


def test_metrics_have_a_listener_of_their_own_unless_the_operator_asks():
    settings = load_config(env={})
    assert (settings.metrics_listen, settings.metrics_on_api_port) == ("127.0.0.1:8401", False)
    assert load_config(env={"LORABOX_METRICS_LISTEN": "[::1]:9100"}).metrics_address == ("::1", 9100)
    assert load_config(env={"LORABOX_METRICS_LISTEN": ""}).metrics_address is None
    for wrong in ("127.0.0.1:8400", "127.0.0.1:٨٤٠١", "localhost", ":8401", "127.0.0.1:0"):
        with pytest.raises(ConfigError, match="metrics_listen"):
            load_config(env={"LORABOX_METRICS_LISTEN": wrong})


def test_a_port_in_use_is_one_line_naming_it_and_its_holder_before_any_engine_work(tmp_path: Path) -> None:
    """Not a traceback after 18 s of importing vLLM, restarted by systemd every 25 s forever."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = write(tmp_path, f'port = {port}\nstate_dir = "{tmp_path / "state"}"\n')
        result = serve_refused(path, timeout_s=60)
    assert result.stdout == f"{EXIT_CONFIG} []\n", result.stderr
    me = " ".join(psutil.Process().cmdline())[:120]
    assert result.stderr == (
        f"lorabox: port {port} on 127.0.0.1 is in use by pid {os.getpid()} ({psutil.Process().username()}: "
        f"{me}): stop that, or set port = <a free port> in {path}\n"
    )
