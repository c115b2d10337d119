"""Reading a request's JSON body: within its size and time limits, and without stalling the loop.

JSON is parsed on the event loop (in a thread it would hold the GIL all the same), so its cost is
kept linear and bounded: the body size is capped (`max_request_bytes`, at most 2 MiB, ~15 ms a MiB
at worst), garbage collection is paused while a body is parsed, and large bodies take turns, one
per pass of the loop, so that bodies arriving together do not add up into one long stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from aiohttp import web

from .connections import BodyTimeout
from .errors import MAX_BODY_BYTES, APIError, bad_request

# A body this large takes up to ~1 ms to parse; larger ones take turns. One lock per process: the
# daemon runs one event loop.
LARGE_BODY_BYTES = 64 << 10
_LARGE_BODY_TURN = asyncio.Lock()
_Parsed = TypeVar("_Parsed")


async def read_json(request: web.Request) -> Any:
    """The body, parsed as JSON."""
    return await read_request(request, _as_is)


def _as_is(body: Any) -> Any:
    return body


async def read_request(request: web.Request, parse: Callable[[Any], _Parsed]) -> _Parsed:
    """The body, parsed as JSON and then by `parse` (which checks it)."""
    limit = request.app[MAX_BODY_BYTES]
    if request.content_length is not None and request.content_length > limit:
        # Refuse before reading a byte of it.
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    encoding = request.headers.get("Content-Encoding", "identity")
    if encoding.lower() != "identity":  # see api/connections.py: bodies are never decompressed
        raise APIError(
            415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed.",
            code="unsupported_content_encoding",
        )  # fmt: skip
    try:
        raw = await request.read()
    except BodyTimeout as exc:
        raise APIError(408, str(exc), code="request_timeout") from exc
    except web.RequestPayloadError as exc:
        raise bad_request(f"The request body could not be read ({exc}).") from exc
    if len(raw) < LARGE_BODY_BYTES:
        with _collector_paused():
            return _parse_json(raw, parse)
    async with _LARGE_BODY_TURN:
        with _collector_paused():
            parsed = _parse_json(raw, parse)
        # Hold the turn across one pass of the loop: bodies that arrived together are parsed in
        # passes of their own, with timers and other requests served in between.
        await asyncio.sleep(0)
    return parsed


def _parse_json(raw: bytes, parse: Callable[[Any], _Parsed]) -> _Parsed:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request("The JSON body is nested too deeply.") from None
    except ValueError as exc:  # bad JSON or UTF-8, or an integer of more than 4300 digits
        raise bad_request(f"We could not parse the JSON body of your request ({exc}).") from None
    try:
        return parse(body)
    except APIError as exc:
        # The traceback's frames hold the body: let it go with them while collection is paused.
        refusal = exc.with_traceback(None)
    finally:
        del body
    raise refusal


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while a body is parsed: the cost is then linear in its size.

    A 1 MiB body of `[[],[],...]` makes 350,000 containers; the collections they trigger each go
    over everything the daemon holds (430,000 objects, 230 ms a time), and held the event loop for
    0.5 s, against 15 ms for the parse alone. Parsing makes no reference cycles to collect.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
