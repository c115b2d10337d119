"""The API's connections: read deadlines, a cap on how many are open, protocol errors as OpenAI errors.

aiohttp closes a connection that sits idle between requests, but sets no deadline on a request
while it is being sent: a client that trickles its headers or its body a byte at a time keeps its
connection, and a file descriptor, as long as it likes, and enough such clients exhaust the
process's descriptors. Here every connection moves through phases,

    head (request line and headers arriving) → body (if any) → handling (the server's turn)
    → idle (kept alive) → head → ...

and the client's phases have deadlines: a head must arrive within `header_timeout_s` of the
connection opening (or of the first byte of the next request on a kept-alive connection), a body
within `body_timeout_s` of its head. A late one gets 408 and the connection closes. At
`max_connections` a new connection closes the one that has waited longest on its client (in head,
body or idle), so that slow or idle connections cannot lock the next client out; only when every
connection has a request being handled is the newcomer answered 503.

aiohttp answers what its HTTP parser refuses (a bad request line, a 100 KB path, oversized headers,
bytes that are not HTTP) before any handler or middleware runs, as plain text; `handle_error` here
answers those in the OpenAI shape, with the status that fits (400, 414, 431).

Request bodies are never decompressed (the API refuses a Content-Encoding with 415): aiohttp would
inflate them on the event loop as they arrive, a 256 KiB gzip body to 256 MiB, which held the loop
for 0.6 s, and no OpenAI client compresses its requests.

This leans on aiohttp's RequestHandler internals (the message queue and waiter that its own
`data_received` uses, `_ErrInfo`); pyproject.toml pins aiohttp's minor version, and
tests/test_http_hostile.py exercises every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .errors import APIError, error_response

log = logging.getLogger(__name__)

# Descriptors the daemon needs besides client connections: engine IPC, SQLite, the admin socket,
# the drop folder's watches, logs.
FD_RESERVE = 256


class BodyTimeout(asyncio.TimeoutError):
    """The request body did not arrive in time.

    A TimeoutError, so that aiohttp's lingering read of an unread body (after the response) takes
    it as the end of that body and closes the connection."""


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


@dataclass
class ConnectionCounters:
    """Shown in /admin/status."""

    open: int = 0
    limit: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0
    evicted: int = 0
    """Connections closed to make room for a new one (idle, or slow to send their request)."""
    refused: int = 0
    """New connections answered 503 because every open one had a request being handled."""


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    HANDLING = "handling"
    IDLE = "idle"
    CLOSING = "closing"


WAITING_ON_CLIENT = (Phase.HEAD, Phase.BODY, Phase.IDLE)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, with the phases and deadlines described above."""

    def __init__(self, server: GuardedServer, **kwargs: Any):
        super().__init__(server, **kwargs)
        self._server = server
        self._phase = Phase.HEAD
        self._deadline: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._responses = 0
        self._request_line_complete = False
        self._request_line_bytes = 0  # of the request being received, to tell a long URL (414)

    # -- phases ---------------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        limits = self._server.limits
        timeout = {Phase.HEAD: limits.header_timeout_s, Phase.BODY: limits.body_timeout_s}.get(phase)
        if timeout:
            self._deadline = self._loop.call_later(timeout, self._expired)
        if phase is Phase.HEAD:
            self._request_line_complete, self._request_line_bytes = False, 0
        self._server.waiting(self, phase in WAITING_ON_CLIENT)

    def _outstanding(self) -> bool:
        """Whether a request has been received and not yet answered."""
        return self._request_count > self._responses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._enter(Phase.HEAD)
        super().connection_made(transport)  # registers with the server, which may refuse it

    def connection_lost(self, exc: BaseException | None) -> None:
        self._enter(Phase.CLOSING)
        self._server.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase is Phase.CLOSING:
            return  # answered already (late, or refused); the connection is closing
        if self._phase is Phase.IDLE and data:
            self._enter(Phase.HEAD)
        if self._phase is Phase.HEAD and not self._request_line_complete:
            end = data.find(b"\n")
            self._request_line_complete = end >= 0
            self._request_line_bytes += end if end >= 0 else len(data)
        received = self._request_count
        super().data_received(data)
        if self._request_count > received:  # a head is complete (or refused by the parser)
            _, payload = self._messages[-1]
            if payload.is_eof():
                self._enter(Phase.HANDLING)
            else:
                self._body = payload
                self._enter(Phase.BODY)
        elif self._phase is Phase.BODY and self._body is not None and self._body.is_eof():
            self._enter(Phase.HANDLING if self._outstanding() else Phase.IDLE)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._responses += 1
            if self._phase is Phase.HANDLING and not self._outstanding():
                self._enter(Phase.IDLE)

    def _expired(self) -> None:
        self._deadline = None
        counters, limits = self._server.counters, self._server.limits
        if self._phase is Phase.HEAD:
            counters.header_timeouts += 1
            self.answer(
                APIError(
                    408,
                    f"The request line and headers did not arrive within {limits.header_timeout_s:g} s.",
                    code="request_timeout",
                )
            )
        elif self._phase is Phase.BODY and self._body is not None:
            counters.body_timeouts += 1
            self._enter(Phase.CLOSING)
            # Whoever reads the body gets this: the handler (an OpenAI 408), or aiohttp's
            # lingering read after an early response (which then closes the connection).
            self._body.set_exception(
                BodyTimeout(f"The request body did not arrive within {limits.body_timeout_s:g} s.")
            )

    def answer(self, error: APIError) -> None:
        """Answer `error` and close, before (or instead of) reading a request.

        Queued as aiohttp queues its parser's errors, so that aiohttp writes the response (through
        `handle_error`) in turn after any request still being handled."""
        self._enter(Phase.CLOSING)
        self._request_count += 1
        self._messages.append(
            (_ErrInfo(status=error.status, exc=error, message=error.message), EMPTY_PAYLOAD)
        )
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- errors aiohttp answers itself ----------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The response aiohttp sends for a request it refused or could not handle: OpenAI-shaped."""
        if isinstance(exc, APIError):
            error = exc
        elif isinstance(exc, HttpProcessingError):
            error = self._parser_refusal(exc)
            log.debug("refused a malformed request from %s: %s", request.remote, exc)
        else:  # raised past every middleware, or a TimeoutError (504)
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            error = APIError(status, "Internal server error; see the lorabox log.", code="internal_error")
        if request.writer.output_size > 0:
            # As aiohttp does: the response has begun, so the connection can only be dropped.
            raise ConnectionError("the response has started; cannot send an error response")
        response = error_response(error.status, error.message, error.param, error.code)
        response.force_close()
        return response

    def _parser_refusal(self, exc: HttpProcessingError) -> APIError:
        if isinstance(exc, LineTooLong) and self._request_line_bytes > self.max_line_size:
            return APIError(
                414, f"The request line is too long; the limit is {self.max_line_size} bytes.",
                code="request_line_too_long",
            )  # fmt: skip
        # The one wording both of aiohttp's parsers (C and Python) use for a header count past the limit.
        if isinstance(exc, LineTooLong) or exc.message == "Too many headers received":
            return APIError(
                431,
                f"The request headers are too large; the limits are {self.max_field_size} bytes "
                f"per header and {self.max_headers} headers.",
                code="headers_too_large",
            )
        reason = (exc.message or "malformed request").splitlines()[0].rstrip(":")
        return APIError(400, f"This is not a valid HTTP/1.1 request: {reason}.", code="bad_http_request")


class GuardedServer(web.Server):
    """aiohttp's connection factory, making guarded connections and keeping their count."""

    def __init__(self, plain: web.Server, limits: ConnectionLimits, counters: ConnectionCounters):
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs | {"auto_decompress": False},
        )
        self.limits, self.counters = limits, counters
        counters.limit = limits.max_connections
        self._open: set[GuardedRequestHandler] = set()
        # Connections waiting on their client, longest-waiting first (dicts keep insertion order).
        self._waiting: dict[GuardedRequestHandler, None] = {}

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def waiting(self, handler: GuardedRequestHandler, waiting: bool) -> None:
        self._waiting.pop(handler, None)
        if waiting:
            self._waiting[handler] = None

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        assert isinstance(handler, GuardedRequestHandler)
        self._open.add(handler)
        if len(self._open) > self.limits.max_connections:
            self._make_room(handler)
        self.counters.open = len(self._open)

    def closed(self, handler: GuardedRequestHandler) -> None:
        self._open.discard(handler)
        self._waiting.pop(handler, None)
        self.counters.open = len(self._open)

    def _make_room(self, newcomer: GuardedRequestHandler) -> None:
        oldest = next((h for h in self._waiting if h is not newcomer), None)
        if oldest is None:
            self.counters.refused += 1
            newcomer.answer(
                APIError(503, "Too many open connections; retry shortly.", code="too_many_connections")
            )
            return
        self.counters.evicted += 1
        self.closed(oldest)
        oldest.force_close()


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections are guarded as described in this module's docstring."""

    def __init__(
        self, app: web.Application, limits: ConnectionLimits, counters: ConnectionCounters, **kwargs: Any
    ):
        super().__init__(app, **kwargs)
        self._limits, self._counters = limits, counters

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._limits, self._counters)


def fit_to_file_limit(max_connections: int) -> int:
    """`max_connections`, or fewer if the open-file limit cannot hold them beside the daemon's own.

    The soft limit is raised towards the hard one first (the systemd unit sets both high; a shell
    often has a soft limit of 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    fitted = max(1, soft - FD_RESERVE)
    log.warning(
        "max_connections %d does not fit the open-file limit (%d); using %d", max_connections, soft, fitted
    )
    return fitted
