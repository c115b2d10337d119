"""The daemons a benchmark compares (one per setting), and the order they are measured in.

Side by side (the default), every daemon stays up and the configurations are measured in
interleaved rounds (A B C, then C B A), so that a machine getting busier or quieter weighs on all
alike; only the one being measured runs: an idle daemon is not idle on the CPU (its engine probe
decodes every few seconds, and vLLM's OpenMP threads spin a while after each), so the others are
stopped with SIGSTOP (their whole process group, the engine's processes too) and continued before
their own turn. One at a time, each daemon is started when first needed once the previous one has
been stopped for good, and measured in one stretch: a GPU holds the engine of one real model, not
one per configuration (a quiet GPU box needs the interleaving less)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable

from appliance.testing.localserver import LocalServer, http_status


def _signal(servers: Iterable[LocalServer], sig: signal.Signals) -> None:
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, sig)


def schedule(
    phases: list[str], rounds: int, server_of: Callable[[str], str], one_at_a_time: bool
) -> list[tuple[int, str]]:
    """(round, phase) in the order to measure them: side by side, each round over every phase,
    every other round backwards; one at a time, every round of one daemon's phases before the
    next daemon's (within a daemon, still every other round backwards)."""
    if not one_at_a_time:
        return [(i, name) for i in range(rounds) for name in (phases if i % 2 == 0 else phases[::-1])]
    groups: dict[str, list[str]] = {}
    for name in phases:
        groups.setdefault(server_of(name), []).append(name)
    return [
        (i, name)
        for group in groups.values()
        for i in range(rounds)
        for name in (group if i % 2 == 0 else group[::-1])
    ]


class Fleet:
    """Daemons by name, each started by `start(name)` when first asked for (see the module)."""

    def __init__(self, start: Callable[[str], LocalServer], *, one_at_a_time: bool = False) -> None:
        self._start = start
        self.one_at_a_time = one_at_a_time
        self.running: dict[str, LocalServer] = {}
        self.start_seconds: dict[str, float] = {}

    def use(self, name: str) -> LocalServer:
        """`name`'s daemon, running (started if need be), every other one stopped or paused."""
        server = self.running.get(name)
        if server is None:
            if self.one_at_a_time:
                self.close()
            else:
                _signal(self.running.values(), signal.SIGSTOP)  # a start alone: its time is its own
            server = self.running[name] = self._start(name)
            self.start_seconds[name] = server.start_seconds
            print(f"{name}: ready in {server.start_seconds:.1f} s", flush=True)
            return server
        _signal((s for s in self.running.values() if s is not server), signal.SIGSTOP)
        _signal([server], signal.SIGCONT)
        deadline = time.monotonic() + 120
        while http_status(f"{server.url}/readyz") != 200:  # its engine probe may have to run again
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after being continued:\n{server.log_tail()}")
            time.sleep(0.1)
        return server

    def close(self) -> None:
        _signal(self.running.values(), signal.SIGCONT)  # a stopped process does not act on SIGTERM
        for server in self.running.values():
            server.stop()
        self.running.clear()
