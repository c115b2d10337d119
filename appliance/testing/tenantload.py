"""One tenant's load: closed-loop clients sending completions back to back, in a process of its own.

Tests and benchmarks run one such process per tenant, so that a tenant sending ten times as many
requests does not also slow the other tenant's client (one client process for both would turn
into a first-come-first-served queue of its own on a busy machine). `start_together` opens every
tenant's window at once: each process says "ready" once it has started (seconds, on a loaded
machine: a fixed head start let one tenant's load begin 13 s after the other's), then all are
given the same start time.

    python -m appliance.testing.tenantload URL KEY --concurrency 8 [--start-at T] --seconds 12 \
        [--stream] [--max-tokens 32] [--prompt TEXT] [--model M]

(without --start-at it prints "ready" and reads the start time, a time.time(), from stdin)

prints one JSON object: the requests that completed within the window, each with its time to
first token, end-to-end time and usage, and how long each request still out at the window's end
had waited without a first token (what a time-to-first-token percentile over completed requests
alone would leave out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


@dataclass
class Done:
    """One request that completed inside the window."""

    sent: float  # seconds after the window opened
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class LoadResult:
    requests: list[Done] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)  # answers other than 200, by status
    # Seconds each request still out when the window closed had waited with no token yet: its time
    # to first token is at least that.
    unanswered_s: list[float] = field(default_factory=list)

    def cost(self, since_s: float = 0.0) -> int:
        """What the fair scheduler counts, prompt + 2 x completion tokens, of the requests that
        completed from `since_s` into the window on (to leave out a warm-up)."""
        return sum(
            r.prompt_tokens + 2 * r.completion_tokens for r in self.requests if r.sent + r.e2e_s >= since_s
        )


@dataclass
class _Out:
    """A request on its way: when it was sent, and its first token's time once one came."""

    began: float = field(default_factory=time.monotonic)
    first: float | None = None


async def _one(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], out: _Out
) -> Done | int:
    began = out.began
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return response.status
        if not body.get("stream"):
            usage = (await response.json())["usage"]
            out.first = time.monotonic()
        else:
            usage = {}
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                elif event.get("choices") and event["choices"][0].get("text"):
                    out.first = out.first or time.monotonic()
    ended = time.monotonic()
    return Done(
        sent=began,
        ttft_s=(out.first or ended) - began,
        e2e_s=ended - began,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )


async def run_load(
    url: str, key: str, body: dict[str, Any], concurrency: int, start_at: float, seconds: float
) -> LoadResult:
    """`start_at` is a time.time() shared by every tenant's process, so that their windows line up.
    At the window's end the requests still out are abandoned (their clients hang up), as a client
    that stops sending does: the run ends then, not once a long queue has drained."""
    result = LoadResult()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    opened = time.monotonic()
    deadline = opened + seconds
    outstanding: dict[int, _Out] = {}  # per client

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        while time.monotonic() < deadline:
            outstanding[n] = _Out()
            done = await _one(session, url, key, body, outstanding[n])
            del outstanding[n]
            if isinstance(done, int):
                result.refused[str(done)] = result.refused.get(str(done), 0) + 1
                await asyncio.sleep(0.05)
            elif time.monotonic() < deadline:
                done.sent -= opened
                result.requests.append(done)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        clients = [asyncio.create_task(client(session, n)) for n in range(concurrency)]
        _, out = await asyncio.wait(clients, timeout=max(0.0, deadline - time.monotonic()))
        closed = time.monotonic()
        result.unanswered_s = [closed - o.began for o in outstanding.values() if o.first is None]
        for task in out:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return result


def body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return payload


class LoadProcess:
    """`run_load` in a child process, started by `start_together`; `result()` waits for it."""

    def __init__(self, url: str, key: str, concurrency: int, seconds: float, **options: Any):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if not isinstance(v, bool)]
        flags += [f"--{k.replace('_', '-')}" for k, v in options.items() if v is True]
        command = [sys.executable, "-m", "appliance.testing.tenantload", url, key]
        command += [f"--concurrency={concurrency}", f"--seconds={seconds}", *flags]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the load process did not start ({line!r})")

    def go(self, start_at: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{start_at}\n")
        self.process.stdin.close()
        self.process.stdin = None  # said all: `communicate` has nothing left to send

    def result(self, timeout_s: float = 300) -> LoadResult:
        out, _ = self.process.communicate(timeout=timeout_s)
        if self.process.returncode != 0:
            raise RuntimeError(f"the load process failed ({self.process.returncode})")
        raw = json.loads(out)
        return LoadResult([Done(**r) for r in raw["requests"]], raw["refused"], raw["unanswered_s"])


def start_together(loads: list[LoadProcess], lead_s: float = 0.5) -> float:
    """Once every process has started, open all their windows at the same time; returns it."""
    for load in loads:
        load.ready()
    start_at = time.time() + lead_s
    for load in loads:
        load.go(start_at)
    return start_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--start-at", type=float)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--model", default="lorabox-demo")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    payload = body(args.model, args.prompt, args.max_tokens, args.stream)
    start_at = args.start_at
    if start_at is None:
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
    result = asyncio.run(run_load(args.url, args.key, payload, args.concurrency, start_at, args.seconds))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
