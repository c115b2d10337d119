"""The base model: a local folder, or a Hugging Face id fetched once into the state folder, never
over the network in tests (the hub is a local folder here, and sockets are shut)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config.basemodel import FETCHED, fetch, model_source, resolve
from appliance.config.settings import Settings
from appliance.errors import ConfigError, LoraboxError
from appliance.ops.cli import main
from tests.conftest import Demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test; the hub client is offline besides."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a test tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class LocalHub:
    """snapshot_download's part that lorabox uses, served from a local folder per repo id."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.calls = repos, []  # type: ignore[var-annotated]

    def __call__(self, *, repo_id: str, local_dir: str, allow_patterns: list[str]) -> str:
        self.calls.append((repo_id, allow_patterns))
        source = self.repos[repo_id]
        for path in source.rglob("*"):
            if path.is_file() and any(path.match(pattern) for pattern in allow_patterns):
                target = Path(local_dir) / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        return local_dir


def test_sources(tmp_path: Path):
    state = tmp_path / "state"
    assert model_source(Settings(state_dir=state)).kind == "builtin"
    assert model_source(Settings(model=str(tmp_path), state_dir=state)).kind == "folder"
    assert model_source(Settings(model="./models/llama", state_dir=state)).kind == "folder"
    hub = model_source(Settings(model="meta-llama/Llama-3.1-8B-Instruct", state_dir=state))
    assert (hub.kind, hub.repo_id) == ("hub", "meta-llama/Llama-3.1-8B-Instruct")
    assert hub.path == state / "models" / "meta-llama--Llama-3.1-8B-Instruct"
    assert Settings(model="meta-llama/Llama-3.1-8B-Instruct").base_model_name == "Llama-3.1-8B-Instruct"
    with pytest.raises(ConfigError, match="model: 'a/b/c' is neither a folder nor a Hugging Face id"):
        model_source(Settings(model="a/b/c", state_dir=state))


def test_a_hub_id_is_fetched_once_then_served_from_the_state_folder(tmp_path: Path, demo: Demo):
    published = tmp_path / "published"
    shutil.copytree(demo.model_dir, published)
    (published / "pytorch_model.bin").write_bytes(b"a pickle lorabox never opens")
    hub = LocalHub({"acme/tiny-llama": published})
    settings = Settings(model="acme/tiny-llama", state_dir=tmp_path / "state")

    with pytest.raises(LoraboxError, match="not downloaded yet: lorabox model fetch"):
        resolve(settings, download=hub, allow_download=False)
    folder = resolve(settings, download=hub)
    assert folder == tmp_path / "state" / "models" / "acme--tiny-llama"
    assert (folder / "config.json").read_bytes() == (demo.model_dir / "config.json").read_bytes()
    assert (folder / "model.safetensors").stat().st_size == (
        demo.model_dir / "model.safetensors"
    ).stat().st_size
    assert not (folder / "pytorch_model.bin").exists()
    assert hub.calls == [("acme/tiny-llama", FETCHED)]
    assert resolve(settings, download=hub) == folder  # already there: no second download
    assert len(hub.calls) == 1


def test_an_interrupted_download_is_never_taken_for_the_model(tmp_path: Path):
    def interrupted(*, repo_id: str, local_dir: str, allow_patterns: list[str]) -> None:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        Path(local_dir, "config.json").write_text("{}")
        raise ConnectionError("connection reset")

    settings = Settings(model="acme/tiny-llama", state_dir=tmp_path)
    with pytest.raises(LoraboxError, match=r"could not download acme/tiny-llama .*ConnectionError"):
        fetch(model_source(settings), interrupted)
    assert not model_source(settings).fetched
    assert (tmp_path / "models" / ".acme--tiny-llama.partial" / "config.json").exists()  # resumed next time


def test_the_real_hub_client_offline_says_so_and_touches_no_network(tmp_path: Path):
    settings = Settings(model="acme/never-published", state_dir=tmp_path)
    with pytest.raises(LoraboxError, match="could not download acme/never-published"):
        resolve(settings)  # huggingface_hub itself, with HF_HUB_OFFLINE=1 and the sockets shut


def test_lorabox_model_fetch_for_a_local_folder(
    tmp_path: Path, demo: Demo, capsys: pytest.CaptureFixture[str]
):
    config = tmp_path / "lorabox.toml"
    config.write_text(f'model = "{demo.model_dir}"\nstate_dir = "{tmp_path}"\n')
    assert main(["model", "fetch", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"model: {demo.model_dir} in {demo.model_dir}"


def test_lorabox_logs_runs_journalctl_for_the_unit(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journalctl = bin_dir / "journalctl"
    journalctl.write_text('#!/bin/sh\necho "journalctl $*"\n')
    journalctl.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "logs", "-f", "-n", "20", "--since", "1 hour ago"],
        cwd=REPO,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        result.stdout
        == "journalctl --unit lorabox.service --lines 20 --no-pager --follow --since 1 hour ago\n"
    )


def test_lorabox_model_fetch_leaves_the_builtin_model_to_the_first_start(tmp_path: Path, capsys):
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert main(["model", "fetch", "--config", str(config)]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    assert not (tmp_path / "state").exists()  # install.sh runs it as root: nothing root-owned left
