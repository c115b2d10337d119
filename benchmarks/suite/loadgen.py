"""The load generator every benchmark drives a server with: streamed OpenAI requests, each with its
own key and model (so one run can mix tenants), sent closed-loop (N clients back to back) or
open-loop (a Poisson arrival rate, the way `vllm bench serve --request-rate` sends), against lorabox,
`vllm serve` or llama.cpp's server alike.

It measures what a client sees: time to first token, the gaps between streamed chunks (inter-token
latency), end-to-end time, and completion tokens (the server's own count from the final usage chunk,
or the chunks counted where a server sends none). SSE events are looked at as bytes,
split from each read as it comes, and only the usage chunk is parsed: a client parsing every
chunk's JSON (or reading line by line) would spend a core at the token rates the gateway-ceiling
benchmark reaches."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.suite.stats import spread

PROMPTS = ["Hello, how can I help", "The quick brown fox", "Support tickets and invoices", "What is lorabox?"]


@dataclass(frozen=True)
class Request:
    key: str
    body: dict[str, Any]
    path: str = "/v1/completions"
    label: str = ""  # e.g. the tenant: summaries are kept per label too


@dataclass
class Outcome:
    label: str
    status: int
    sent_s: float  # after the run began
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def completions(
    tenants: dict[str, str], max_tokens: int = 64, prompts: list[str] | None = None, ignore_eos: bool = True
) -> Iterator[Request]:
    """Requests cycling over `tenants` (model name -> key) and prompts: greedy, streamed, with usage.
    `ignore_eos` keeps every answer `max_tokens` long, so that runs compare like with like (the demo
    model stops early on some prompts); every server here accepts vLLM's extra parameter."""
    names = itertools.cycle(sorted(tenants))
    texts = itertools.cycle(prompts or PROMPTS)
    while True:
        model = next(names)
        body: dict[str, Any] = {
            "model": model,
            "prompt": next(texts),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:
            body["ignore_eos"] = True
        yield Request(tenants[model], body, label=model)


async def send(session: aiohttp.ClientSession, url: str, request: Request, began: float) -> Outcome:
    sent = time.perf_counter()
    outcome = Outcome(request.label, 0, sent - began)
    last = sent
    chunks = 0
    headers = {"Authorization": f"Bearer {request.key}"}
    try:
        async with session.post(url + request.path, json=request.body, headers=headers) as response:
            outcome.status = response.status
            if response.status != 200:
                outcome.error = (await response.text())[:300]
                return outcome
            # What arrived, split into events here: aiohttp's line reader costs a client core
            # at the gateway ceiling's rates. Events that arrive in one read arrive together.
            pending = b""
            async for data in response.content.iter_any():
                now = time.perf_counter()
                if b"\r" in data:  # sse-starlette (llama.cpp's Python server) ends lines with CRLF
                    data = data.replace(b"\r\n", b"\n")
                *events, pending = (pending + data).split(b"\n\n")
                for line in events:
                    if not line.startswith(b"data: {"):
                        continue
                    if b'"usage": {' in line or b'"usage":{' in line:
                        usage = json.loads(line[6:]).get("usage") or {}
                        outcome.prompt_tokens = usage.get("prompt_tokens", 0)
                        outcome.completion_tokens = usage.get("completion_tokens", 0)
                        if b'"choices": []' in line or b'"choices":[]' in line:
                            continue
                    chunks += 1
                    if chunks == 1:
                        outcome.ttft_s = now - sent
                    else:
                        outcome.gaps_s.append(now - last)
                    last = now
    except (TimeoutError, aiohttp.ClientError) as error:
        outcome.error = repr(error)
        return outcome
    outcome.e2e_s = time.perf_counter() - sent
    outcome.completion_tokens = outcome.completion_tokens or chunks
    return outcome


@dataclass
class Run:
    outcomes: list[Outcome]
    seconds: float  # the window: from the first request sent to the last answer

    def ok(self, label: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and not o.error and label in (None, o.label)]

    def summary(self, label: str | None = None) -> dict[str, Any]:
        done = self.ok(label)
        tokens = sum(o.completion_tokens for o in done)
        ttft, e2e = spread([o.ttft_s for o in done], 1000), spread([o.e2e_s for o in done], 1000)
        itl = spread([gap for o in done for gap in o.gaps_s], 1000)
        return {
            "requests": len(done),
            "failed": sum(1 for o in self.outcomes if label in (None, o.label)) - len(done),
            "req_per_s": len(done) / self.seconds if self.seconds else 0.0,
            "tok_per_s": tokens / self.seconds if self.seconds else 0.0,
            "ttft_p50_ms": ttft["p50"],
            "ttft_p99_ms": ttft["p99"],
            "itl_p50_ms": itl["p50"],
            "itl_p99_ms": itl["p99"],
            "e2e_p50_ms": e2e["p50"],
            "e2e_p99_ms": e2e["p99"],
        }

    def errors(self) -> list[str]:
        return sorted({f"{o.status} {o.error}" for o in self.outcomes if o.status != 200 or o.error})


def session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
    )


async def timed(url: str, request: Request, http: aiohttp.ClientSession | None = None) -> float:
    """Seconds one request (not streamed) takes to be answered whole; raises unless it is a 200.
    A session of the caller's keeps its connection open between the requests it times."""
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(aiohttp.ClientSession())
        began = time.perf_counter()
        async with http.post(
            url + request.path, json=request.body, headers={"Authorization": f"Bearer {request.key}"}
        ) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{request.label or request.path}: {response.status}")
        return time.perf_counter() - began


async def closed_loop(url: str, requests: Iterator[Request], clients: int, seconds: float) -> Run:
    """`clients` clients, each sending its next request as soon as its last is answered, until
    `seconds` have passed (requests out then are waited for and counted)."""
    outcomes: list[Outcome] = []
    async with session(clients) as http:
        began = time.perf_counter()
        deadline = began + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                outcomes.append(await send(http, url, next(requests), began))

        await asyncio.gather(*(client() for _ in range(clients)))
        return Run(outcomes, time.perf_counter() - began)


async def open_loop(
    url: str,
    requests: Iterator[Request],
    rate: float,
    seconds: float,
    seed: int = 0,
    max_outstanding: int = 1024,
) -> Run:
    """Requests arriving as a Poisson process of `rate` per second for `seconds`, whether or not the
    earlier ones have been answered (up to `max_outstanding`, so that an overloaded server ends the
    run with a queue, not with the client out of sockets)."""
    pace = random.Random(seed)  # noqa: S311 (arrival times, not secrets)
    outcomes: list[Outcome] = []
    async with session(max_outstanding) as http:
        began = time.perf_counter()
        at = 0.0
        pending: set[asyncio.Task[None]] = set()

        async def one(request: Request) -> None:
            outcomes.append(await send(http, url, request, began))

        while at < seconds:
            delay = began + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(next(requests)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            at += pace.expovariate(rate)
        await asyncio.gather(*pending)
        return Run(outcomes, time.perf_counter() - began)


def run(load: Callable[[], Any]) -> Run:
    """asyncio.run for a closed_loop/open_loop call: `run(lambda: closed_loop(...))`."""
    result: Run = asyncio.run(load())
    return result
