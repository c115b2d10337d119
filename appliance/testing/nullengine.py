"""A test double behind the engine protocol: no model, tokens as fast as the caller takes them.

It measures lorabox's own layers (HTTP, auth, admission, the fair queue, detokenisation, SSE, the
ledger) with no engine cost under them (benchmarks/gateway_ceiling.py), and lets tests run the
daemon without one. It lives here, in appliance/testing, and only `python -m
appliance.testing.nullserve` puts it behind the daemon: `lorabox serve` cannot select it.

Each request's output is `token_ids` over and over, `tokens_per_delta` to a delta, until
`max_tokens` ("length") or a token of `stop_token_ids` ("stop", the stop token included, as the
real engines send it). Between deltas it yields to the event loop once, as an engine's queue does,
so that streams run side by side; closing the stream early aborts the request (counted in
`aborted`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from ..engines.base import (
    AdapterRef,
    AdapterSupport,
    EngineOptions,
    EngineStats,
    GenerationRequest,
    TokenDelta,
)


class NullEngine:
    name = "null"
    adapter_support = AdapterSupport("null (test double)")

    def __init__(
        self,
        options: EngineOptions,
        token_ids: Sequence[int],
        tokens_per_delta: int = 1,
        batch: int = 1024,
    ):
        if not token_ids or tokens_per_delta < 1:
            raise ValueError("the null engine needs token ids to emit, at least one per delta")
        self.options = options
        self.token_ids = list(token_ids)
        self.tokens_per_delta = tokens_per_delta
        self.batch = batch
        self.adapters: set[str] = set()
        self.pinned: set[str] = set()
        self.running = 0
        self.finished = 0
        self.aborted = 0
        self.started = False

    @property
    def max_batch(self) -> int:
        return self.batch

    @property
    def max_model_len(self) -> int:
        return self.options.max_model_len

    async def start(self) -> None:
        self.started = True

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if request.adapter is not None:
            self.adapters.add(request.adapter.name)
        cycle, stops = self.token_ids, set(request.stop_token_ids)
        produced, finished = 0, False
        self.running += 1
        try:
            while True:
                chunk: list[int] = []
                finish = None
                while len(chunk) < self.tokens_per_delta:
                    token = cycle[produced % len(cycle)]
                    chunk.append(token)
                    produced += 1
                    if token in stops:
                        finish = "stop"
                    elif produced >= request.max_tokens:
                        finish = "length"
                    if finish is not None:
                        break
                finished = finish is not None
                yield TokenDelta(chunk, finish)
                if finished:
                    return
                await asyncio.sleep(0)
        finally:
            self.running -= 1
            if finished:
                self.finished += 1
            else:
                self.aborted += 1

    async def load_adapter(self, adapter: AdapterRef) -> None:
        self.adapters.add(adapter.name)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        self.adapters.discard(adapter.name)
        self.pinned.discard(adapter.name)

    async def pin_adapter(self, adapter: AdapterRef) -> None:
        self.adapters.add(adapter.name)
        self.pinned.add(adapter.name)

    async def unpin_adapter(self, adapter: AdapterRef) -> None:
        self.pinned.discard(adapter.name)

    def failure(self) -> str | None:
        return None

    async def probe(self) -> None:
        await asyncio.sleep(0)

    def stats(self) -> EngineStats:
        return EngineStats(
            self.name,
            "cpu",
            loaded_adapters=sorted(self.adapters),
            running_requests=self.running,
            pinned=sorted(self.pinned),
            extra={"finished": self.finished, "aborted": self.aborted},
        )

    async def shutdown(self) -> None:
        self.started = False
