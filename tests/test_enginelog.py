"""The engine's output in lorabox's log: the known benign lines out, by name; everything else in,
whichever way an engine process writes it; the engine's INFO only with --verbose. And the CPU
engine's processes on tcmalloc where it is installed."""

from __future__ import annotations

import ctypes.util
import io
import os
import re
import subprocess
import sys

import psutil

from appliance.engines.enginelog import KNOWN_BENIGN, engine_log_level, is_benign, sieve
from appliance.engines.vllm import preload_tcmalloc

BENIGN = KNOWN_BENIGN[0]

# A daemon that quiets the engine's logging, then starts an "engine process" the way vLLM does
# (inheriting stdout and stderr while filtered_output() runs), which writes through every door.
ENGINE_PROCESS = r"""
import logging, os, sys, warnings
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
warnings.warn("`torch.distributed.reduce_op` is deprecated, please use ReduceOp", FutureWarning)
warnings.warn("some other deprecation", FutureWarning)
logging.getLogger("vllm.x").warning("Model Runner V2 requires Triton; using the V1 model runner instead.")
logging.getLogger("vllm.x").error("the engine core died: out of memory")
os.write(2, b"[W1207 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation\n")
os.write(1, b"a line on stdout\n")
"""

DAEMON = f"""
import logging, subprocess, sys
from appliance.engines.enginelog import filtered_output, quiet_engine_logging
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
quiet_engine_logging("WARNING")
logging.getLogger("vllm.triton_utils.importing").warning("{BENIGN}. Disabling Triton.")
logging.getLogger("vllm.triton_utils.importing").info("Triton is installed but 0 active driver(s) found")
with filtered_output():
    engine = subprocess.Popen([sys.executable, "-c", {ENGINE_PROCESS!r}])
    logging.getLogger("appliance.daemon").warning("the daemon's own line while the engine starts")
engine.wait()
logging.getLogger("appliance.daemon").info("after")
logging.getLogger("appliance.daemon").warning("the daemon's own line after")
"""


def test_known_benign_lines_are_dropped_and_everything_else_is_passed_on() -> None:
    out = io.BytesIO()
    sieve(io.BytesIO(f"WARNING {BENIGN}. Disabling Triton.\nERROR the engine core died\n\n".encode()), out)
    assert out.getvalue() == b"ERROR the engine core died\n\n"
    assert all(is_benign(f"(EngineCore pid=1) WARNING 12-07 [x.py:1] {text}.") for text in KNOWN_BENIGN)
    assert not is_benign("(EngineCore pid=1) ERROR 12-07 [core.py:1] EngineCore failed to start.")


def test_an_engine_process_is_heard_but_for_its_known_benign_lines() -> None:
    run = subprocess.run(
        [sys.executable, "-c", DAEMON], capture_output=True, text=True, timeout=120, check=True
    )
    heard = run.stdout + run.stderr
    for line in (
        "FutureWarning: some other deprecation",  # by name: other warnings still show
        "ERROR vllm.x: the engine core died: out of memory",
        "a line on stdout",
        "the daemon's own line while the engine starts",
        "the daemon's own line after",
    ):
        assert line in heard, heard
    assert not [line for line in heard.splitlines() if is_benign(line)], heard
    assert "reduce_op" not in heard
    assert "0 active driver" not in heard  # the engine's INFO, below its level


def test_the_engines_info_takes_verbose_and_its_debug_takes_debug() -> None:
    assert engine_log_level("info", verbose=False) == "WARNING"
    assert engine_log_level("warning", verbose=False) == "WARNING"
    assert engine_log_level("info", verbose=True) == "INFO"
    assert engine_log_level("debug", verbose=False) == "DEBUG"


def test_the_live_daemon_logs_no_known_benign_line_and_none_of_the_engines_info(server) -> None:
    log = server.local.log_path.read_text(errors="replace")
    assert "ready in" in log
    assert [line for line in log.splitlines() if is_benign(line)] == []
    # vLLM's INFO, in lorabox's format (the daemon) or in vLLM's own (its processes)
    assert re.findall(r"INFO vllm\.|\) INFO \d\d-\d\d", log) == []
    assert "Loading safetensors checkpoint shards" not in log


def test_tcmalloc_goes_first_in_the_engines_preload_where_it_is_installed(monkeypatch) -> None:
    found = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    monkeypatch.setattr(ctypes.util, "find_library", found.get)
    monkeypatch.setenv("LD_PRELOAD", "/torch/lib/libgomp.so.1")
    assert preload_tcmalloc() == "libtcmalloc_minimal.so.4"
    assert os.environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/torch/lib/libgomp.so.1"
    assert preload_tcmalloc() is None  # there already: once
    assert os.environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/torch/lib/libgomp.so.1"

    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(ctypes.util, "find_library", {}.get)  # not installed: nothing changes
    assert preload_tcmalloc() is None
    assert "LD_PRELOAD" not in os.environ


def test_the_live_engines_worker_runs_on_tcmalloc_or_says_it_does_not(server) -> None:
    worker = next(
        p for p in psutil.Process(server.local.process.pid).children(recursive=True) if "Worker" in p.name()
    )
    mapped = " ".join(m.path for m in worker.memory_maps())
    log = server.local.log_path.read_text(errors="replace")
    if ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc"):
        assert "libtcmalloc" in mapped
        assert "libtcmalloc is not found in LD_PRELOAD" not in log
    else:  # vLLM's own hint, pointing at the gain, is left in the log
        assert "libtcmalloc is not found in LD_PRELOAD" in log
