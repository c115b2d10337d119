"""Streams opened and left unread, and scrapes of a box's model server protocol metrics: for tests
that look at a box while a tenant's requests run, and after.

A stream's output fits the kernel's buffers, so the server finishes it whether or not the client
reads: a scrape taken after the first chunk may or may not find it running. `in_flight_scrape`
therefore proves it: a second scrape that still finds the tenant's adapter running shows the first
was taken while it ran (every request of the tenant started before the first scrape)."""

from __future__ import annotations

import json
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
    """A streamed completion on a raw socket, read up to its first chunk; `drain` reads it to the end."""

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

    def drain(self) -> bytes:
        """Reads to the end of the response (the server closes it after [DONE])."""
        while chunk := self.sock.recv(65536):
            self.received += chunk
        self.sock.close()
        assert b"data: [DONE]" in self.received, self.received[-300:]
        return self.received


@contextmanager
def held_streams(url: str, key: str, model: str, count: int = 4) -> Iterator[list[HeldStream]]:
    """`count` long streams of `model` running at once; drained (to [DONE]) on the way out."""
    streams = [
        HeldStream(url, key, {"model": model, "prompt": "Hello", "max_tokens": 400}) for _ in range(count)
    ]
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
    when `still_running()` (asked after it) says they had not all ended; else tries again."""
    for _ in range(tries):
        with open_streams():
            taken = scrape_all()
            if still_running():
                return taken
        time.sleep(0.1)
    raise AssertionError(f"no scrape caught the streams in flight in {tries} tries (a very fast engine?)")
