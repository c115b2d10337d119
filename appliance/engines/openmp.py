"""OpenMP's wait policy in the daemon's process: passive, set before anything loads OpenMP.

llama.cpp's CPU threads are OpenMP's (llama-cpp-python's libggml-cpu is built with it), and
OpenMP's threads spin between parallel regions by default (GOMP_SPINCOUNT 300,000). In the
daemon's process, on a machine where anything else runs, spinning threads take the CPU from the
event loop and from each other: the llama.cpp decode step waits at each of its barriers for a
thread the machine has put aside. Passive, they sleep at once.

libgomp reads OMP_WAIT_POLICY once, when it loads, and the first to load it in the daemon is not
llama.cpp but torch (through PEFT, imported while the daemon is built; llama.cpp then shares
torch's libgomp): so `lorabox serve` sets the policy first thing, unless the operator set it.
Measured (demo model, 2 cores, 2 threads, one busy process beside it): 60 structured-output
requests took 591 s with the policy set too late, 14 s passive. On a quiet machine spinning is
faster where several threads share a step (2 threads: 4.6 s against 18 s passive): an operator
whose box runs nothing else can set OMP_WAIT_POLICY=ACTIVE. With one thread (what the default
`llamacpp_threads` gives on 2 cores, llamacpp.py's `default_threads`) no thread waits for another:
6.4 s beside the busy process, 6.8 s quiet. Spinning briefly does not help where a core is taken:
2 threads spinning 10,000 rounds (GOMP_SPINCOUNT) served 44-51 tokens/s beside the busy process,
against 640-890 passive.

vLLM's engine processes set their OpenMP up themselves (thread binding; the spin it wants): they
start without the policy lorabox set (`leave_to_vllm`), as vLLM ships.
"""

from __future__ import annotations

import os

VARIABLE = "OMP_WAIT_POLICY"
_set_here = False


def passive() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE for this process, unless the environment names a policy."""
    global _set_here
    if VARIABLE not in os.environ:
        os.environ[VARIABLE] = "PASSIVE"
        _set_here = True


def leave_to_vllm() -> None:
    """Before vLLM starts its processes: take back the policy `passive` set (an operator's stays).
    This process's OpenMP read it already, if loaded."""
    global _set_here
    if _set_here:
        os.environ.pop(VARIABLE, None)
        _set_here = False
