"""OpenMP's wait policy: passive in the daemon's process, where llama.cpp's threads run (set before
torch loads libgomp, which llama.cpp then shares), and as vLLM sets it in vLLM's processes."""

from __future__ import annotations

import os
import re

import psutil
import pytest

from appliance.engines import openmp
from tests.conftest import Server


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(openmp.VARIABLE, raising=False)
    monkeypatch.setattr(openmp, "_set_here", False)


def test_passive_is_set_unless_the_operator_named_a_policy(fresh, monkeypatch) -> None:
    openmp.passive()
    assert os.environ[openmp.VARIABLE] == "PASSIVE"
    openmp.leave_to_vllm()  # what lorabox set, vLLM's processes do not get
    assert openmp.VARIABLE not in os.environ
    openmp.leave_to_vllm()
    assert openmp.VARIABLE not in os.environ

    monkeypatch.setenv(openmp.VARIABLE, "ACTIVE")  # the operator's: kept, for both
    openmp.passive()
    openmp.leave_to_vllm()
    assert os.environ[openmp.VARIABLE] == "ACTIVE"


def spin_counts(server: Server) -> list[str]:
    """GOMP_SPINCOUNT of each libgomp the daemon's processes loaded before it was ready, in order."""
    log = server.local.log_path.read_text(errors="replace")
    return re.findall(r"GOMP_SPINCOUNT = '(\d+)'", log.split("ready in", 1)[0])


def test_the_llamacpp_daemons_openmp_sleeps_between_steps(llamacpp_server) -> None:
    """libgomp's own account (OMP_DISPLAY_ENV, conftest): the daemon's process loads two, in this
    order: sentencepiece's private copy (its own, at import, before anything of lorabox runs), then
    torch's `libgomp.so.1`, the one llama.cpp's CPU backend links to. That one spins not at all."""
    spins = spin_counts(llamacpp_server)
    assert spins, "libgomp printed nothing: OMP_DISPLAY_ENV did not reach the daemon"
    assert spins[-1] == "0", spins
    mapped = {m.path for m in psutil.Process(llamacpp_server.local.process.pid).memory_maps()}
    assert [p for p in mapped if p.endswith("/libgomp.so.1")], "llama.cpp's libgomp is not torch's"


def test_vllms_processes_start_without_lorabox_s_policy(server) -> None:
    """libgomp's account again: the daemon's own (torch's, loaded after lorabox set the policy)
    sleeps; each of vLLM's processes loads its own with vLLM's settings, spinning as vLLM ships.
    (Their environment cannot be read instead: vLLM renames its processes over it.)"""
    spins = spin_counts(server)
    assert spins.count("0") == 1, spins  # the daemon's
    assert spins.count("300000") >= 2, spins  # sentencepiece's in the daemon, and vLLM's processes'
