"""Streams opened and left unread, and scrapes of a box's model server protocol metrics: for tests
that look at a box while a tenant's requests run, and after.

A stream's output fits the kernel's buffers, so the server finishes it whether or not the client
reads: a scrape taken after the first chunk may or may not find it running. `in_flight_scrape`
therefore proves it: a second scrape that still finds the tenant's adapter running shows the first
was taken while it ran (every request of the tenant started before the first scrape)."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PROTOCOL_FAMILIES = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:lora_requests_info": "gauge",
    "vllm:cache_config_info": "gauge",
}


def scrape(metrics_url: str) -> dict[str, Any]:
    """The metrics listener's families by name, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:  # noqa: S310 (loopback only)
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def lora_info(families: dict[str, Any]) -> dict[str, Any]:
    """The newest `vllm:lora_requests_info` series, as the endpoint picker reads it: the adapter lists
    split on commas and trimmed, `max_lora` as a number."""
    latest = max(families["vllm:lora_requests_info"].samples, key=lambda sample: sample.value)

    def names(text: str) -> set[str]:
        return {name.strip() for name in text.split(",") if name.strip()}

    return {
        "running": names(latest.labels["running_lora_adapters"]),
        "waiting": names(latest.labels["waiting_lora_adapters"]),
        "max_lora": int(latest.labels["max_lora"]),
        "at": latest.value,
    }


def gauge(families: dict[str, Any], name: str) -> float:
    return float(families[name].samples[0].value)


class HeldStream:
    """A streamed completion on a raw socket, read up to its first chunk; `drain` reads it to the end
    and checks that it generated: no error told in-band (which a 200 stream ends with, then [DONE])."""

    def __init__(self, url: str, key: str, body: dict[str, Any]):
        host, port = url.removeprefix("http://").split(":")
        data = json.dumps(body | {"stream": True}).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: lorabox\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)
        self.received = b""
        while b"data: " not in self.received:  # the first chunk: the request runs
            chunk = self.sock.recv(65536)
            assert chunk, self.received
            self.received += chunk
        assert self.received.startswith(b"HTTP/1.1 200"), self.received[:300]

    def events(self) -> list[Any]:
        """The events received so far, parsed ("[DONE]" as the string)."""
        found = re.findall(rb"^data: (.*)$", self.received, flags=re.MULTILINE)
        return [line.decode() if line == b"[DONE]" else json.loads(line) for line in found]

    def summary(self) -> str:
        """What it got, for a failure's message: how many chunks, how it finished."""
        events = self.events()
        ends = [c.get("finish_reason") for e in events if isinstance(e, dict) for c in e.get("choices", [])]
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        return f"{len(events)} events, finish {[f for f in ends if f]}, errors {errors}"

    def drain(self) -> bytes:
        """Reads to the end of the response (the server closes it after [DONE])."""
        while chunk := self.sock.recv(65536):
            self.received += chunk
        self.sock.close()
        events = self.events()
        assert events[-1:] == ["[DONE]"], self.received[-300:]
        assert not any(isinstance(e, dict) and "error" in e for e in events), self.summary()
        return self.received


@contextmanager
def held_streams(
    url: str, key: str, model: str, count: int = 4, max_tokens: int = 400
) -> Iterator[list[HeldStream]]:
    """`count` streams of `model` running at once, each generating `max_tokens` (the model's end of
    sequence does not end them early); drained (to [DONE]) on the way out."""
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True}
    streams = [HeldStream(url, key, body) for _ in range(count)]
    try:
        yield streams
    finally:
        for stream in streams:
            stream.drain()


def in_flight_scrape(
    scrape_all: Callable[[], Any],
    still_running: Callable[[], bool],
    open_streams: Callable[[], Any],
    tries: int = 10,
) -> Any:
    """`scrape_all()` taken while a tenant's streams ran: opens streams, scrapes, and keeps the scrape
    when `still_running()` (asked after it) says they had not all ended; else tries again. Failing,
    it says what each try saw: how long the scrapes took, and what the streams got."""
    seen = []
    for _ in range(tries):
        with open_streams() as streams:
            started = time.monotonic()
            taken = scrape_all()
            scraped = time.monotonic()
            running = still_running()
            asked = time.monotonic()
            if running:
                return taken
        summaries = "; ".join(stream.summary() for stream in streams)
        seen.append(f"scrape {scraped - started:.3f} s, asked {asked - scraped:.3f} s, streams: {summaries}")
        time.sleep(0.1)
    raise AssertionError(f"no scrape caught the streams in flight in {tries} tries:\n" + "\n".join(seen))
