"""What careless or hostile clients send: each gets a clear OpenAI-shaped error, nothing breaks."""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import time

import aiohttp
import pytest

from tests.conftest import no_loop_stall, post_json
from tests.probing import CHAT, assert_openai_error, raw_exchange, repeatedly, served_meanwhile

MIB = 1 << 20


def chat_body(**overrides):
    return {"model": "acme", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | overrides


@pytest.mark.parametrize(
    ("raw", "why"),
    [(b"{", "truncated"), (b"not json", "text"), (b"\xff\xfe\x00", "binary"), (b"", "empty")],
)
def test_malformed_json_is_400(server, raw, why):
    status, body = post_json(server.url + CHAT, None, server.demo.keys["acme"], raw=raw)
    assert status == 400, why
    assert_openai_error(body)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages"),
        ({"model": 7}, "model"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),  # fits the int range, not the context window
        ({"temperature": "hot"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),  # past the tenant's max_n (4, the default)
        ({"cache_salt": "globex"}, "cache_salt"),
    ],
)
def test_wrong_types_and_values_are_400(server, overrides, param):
    status, body = post_json(server.url + CHAT, chat_body(**overrides), server.demo.keys["acme"])
    assert status == 400, body
    assert_openai_error(body, param)


def test_unknown_fields_are_ignored(server):
    status, body = post_json(
        server.url + CHAT, chat_body(foo=1, metadata={"x": "y"}), server.demo.keys["acme"]
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]


def test_ten_megabyte_body_is_413_and_server_keeps_serving(server):
    huge = chat_body(messages=[{"role": "user", "content": "a" * (10 << 20)}])
    status, body = post_json(server.url + CHAT, huge, server.demo.keys["acme"])
    assert status == 413
    assert_openai_error(body)
    assert post_json(server.url + CHAT, chat_body(), server.demo.keys["acme"])[0] == 200


def test_missing_and_wrong_keys_are_401(server):
    for key in (None, "", "Bearer", "lbx-00000000-forged", "x" * 5000):
        status, body = post_json(server.url + CHAT, chat_body(), key)
        assert status == 401, key
        assert_openai_error(body)


@pytest.mark.parametrize(
    "model", ["globex", "globex@v1", "initech@v1", "acme@v9", "../globex", "acme@../globex", ""]
)
def test_another_tenants_adapter_is_not_found(server, model):
    status, body = post_json(server.url + CHAT, chat_body(model=model), server.demo.keys["acme"])
    expected = 400 if model == "" else 404
    assert status == expected, body
    assert_openai_error(body, "model")


def test_not_found_does_not_reveal_whether_a_tenant_exists(server):
    key = server.demo.keys["acme"]
    existing = post_json(server.url + CHAT, chat_body(model="globex"), key)[1]["error"]["message"]
    missing = post_json(server.url + CHAT, chat_body(model="nosuchtenant"), key)[1]["error"]["message"]
    assert existing.replace("globex", "X") == missing.replace("nosuchtenant", "X")


def test_unknown_route_is_openai_shaped_404(server):
    status, body = post_json(server.url + "/v1/nothing", {}, server.demo.keys["acme"])
    assert status == 404
    assert_openai_error(body)


def _usage_rows(database, where: str, args) -> list[tuple]:
    with sqlite3.connect(database) as db:
        return db.execute(f"select status, completion_tokens from usage where {where}", args).fetchall()  # noqa: S608


async def _hang_up_mid_stream(server, marker: str) -> list[tuple]:
    """Start a long streamed completion, hang up after its first event; the usage rows it left."""
    body = {
        "model": "globex",
        "prompt": "tenant adapter box",
        "max_tokens": 900,
        "stream": True,
        "temperature": 0,
        "user": marker,
    }
    headers = {"Authorization": f"Bearer {server.demo.keys['globex']}"}
    before = len(_usage_rows(server.demo.database, "tenant = ? order by id", ["globex"]))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions", json=body, headers=headers) as response:
            assert response.status == 200
            await response.content.readline()  # the first event has arrived: generation is running
            response.close()  # hang up, long before 900 tokens
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            rows = _usage_rows(server.demo.database, "tenant = ? order by id", ["globex"])
            if len(rows) > before:
                return rows[before:]
    raise AssertionError("the request left no usage row")


async def test_client_disconnect_aborts_the_generation(server):
    """A client that goes away mid-stream stops its generation and is recorded as 499.

    On a loaded machine the whole generation (about 3 s) can occasionally finish before the
    hang-up reaches the server, so up to three tries; a server that ignores hang-ups fails all."""
    outcomes = []
    for attempt in range(3):
        outcomes += await _hang_up_mid_stream(server, f"disconnect-{attempt}-{time.time_ns()}")
        if any(status == 499 and tokens < 900 for status, tokens in outcomes):
            break
    assert any(status == 499 and tokens < 900 for status, tokens in outcomes), outcomes
    assert post_json(server.url + CHAT, chat_body(), server.demo.keys["acme"])[0] == 200


def test_health_and_readiness(server):
    import urllib.request

    for path, expected in (("/healthz", "ok"), ("/readyz", "ready")):
        with urllib.request.urlopen(server.url + path, timeout=5) as response:  # noqa: S310
            assert json.loads(response.read())["status"] == expected


# -- hostile requests: each is refused with a 4xx while everyone else is served ------------------


def _json(body) -> bytes:
    return json.dumps(body).encode()  # writes a lone surrogate as the escape \\udxxx, as clients do


def _with_field(name: str, raw_value: bytes) -> bytes:
    return _json(chat_body())[:-1] + b', "' + name.encode() + b'": ' + raw_value + b"}"


def _user_says(text: str) -> bytes:
    return _json(chat_body(messages=[{"role": "user", "content": text}]))


def _completion(prompt) -> bytes:
    return _json({"model": "acme", "prompt": prompt, "max_tokens": 4})


COMPLETIONS = "/v1/completions"


HI = [{"role": "user", "content": "hi"}]
# 350,000 empty lists in 1 MiB: their garbage collection once held the loop for 0.5 s.
CONTAINERS = b"[" + b"[]," * (MIB // 3 - 100) + b"[]]"

# (id, path, body, extra headers, status, param): client mistakes, up to the size limits.
HOSTILE_BODIES = [
    ("nested-100000-deep", CHAT, lambda: b"[" * 100_000, {}, 400, None),
    ("nested-objects", CHAT, lambda: b'{"a": ' * 50_000, {}, 400, None),
    ("integer-of-5000-digits", CHAT, lambda: _with_field("seed", b"7" * 5000), {}, 400, None),
    ("stop-of-1MB", CHAT, lambda: _json(chat_body(stop="x" * (MIB - 200))), {}, 400, "stop"),
    ("surrogate-in-message", CHAT, lambda: _user_says("a\ud800"), {}, 400, "messages"),
    ("surrogate-in-prompt", COMPLETIONS, lambda: _completion("\udfff"), {}, 400, "prompt"),
    ("surrogate-in-stop", CHAT, lambda: _json(chat_body(stop=["\ud800"])), {}, 400, "stop"),
    ("surrogate-in-user", CHAT, lambda: _json(chat_body(user="\ud800")), {}, 400, "user"),
    ("surrogate-in-model", CHAT, lambda: _json(chat_body(model="acme@v1\ud800")), {}, 400, "model"),
    ("350000-containers", CHAT, lambda: _with_field("junk", CONTAINERS)[:-1] + b', "n": 0}', {}, 400, "n"),
    ("1MiB-chat-prompt", CHAT, lambda: _user_says("hello world " * (MIB // 12 - 20)), {}, 400, "max_tokens"),
    ("1MiB-completion-prompt", COMPLETIONS, lambda: _completion("a" * (MIB - 99)), {}, 400, "max_tokens"),
    ("300000-token-ids", COMPLETIONS, lambda: _completion([5] * 300_000), {}, 400, "max_tokens"),
    ("4097-messages", CHAT, lambda: _json(chat_body(messages=HI * 4097)), {}, 400, "messages"),
    ("4096-messages", CHAT, lambda: _json(chat_body(messages=HI * 4096)), {}, 400, "max_tokens"),
    ("gzip-bomb", CHAT, lambda: gzip.compress(b" " * (256 * MIB)), {"Content-Encoding": "gzip"}, 415, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "make_body", "headers", "status", "param"),
    [case[1:] for case in HOSTILE_BODIES],
    ids=[case[0] for case in HOSTILE_BODIES],
)
def test_hostile_body_is_refused_while_others_are_served(server, path, make_body, headers, status, param):
    raw = make_body()
    headers = {
        "Authorization": f"Bearer {server.demo.keys['acme']}",
        "Content-Type": "application/json",
    } | headers

    async def send():
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.post(server.url + path, data=raw, headers=headers) as response,
        ):
            return response.status, await response.json(content_type=None)

    async def send_two_at_once():  # bodies that arrive together must not stall the loop together
        return await asyncio.gather(send(), send())

    with no_loop_stall(server.demo):
        rounds = asyncio.run(served_meanwhile(server, repeatedly(send_two_at_once)))
    for got_status, body in (result for results in rounds for result in results):
        assert got_status == status, body
        assert_openai_error(body, param)


def _request(head: bytes, body: bytes = b"", key: str = "") -> bytes:
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""
    return head + b"\r\nHost: lorabox\r\n" + auth + b"Content-Length: %d\r\n\r\n" % len(body) + body


CHUNKED = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer "
)

# (id, request bytes given the acme key, status): what aiohttp's own parser refuses, and headers.
HOSTILE_REQUESTS = [
    ("100KB-path", lambda key: _request(b"GET /" + b"a" * 100_000 + b" HTTP/1.1"), 414),
    ("20KB-header", lambda key: _request(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000), 431),
    ("200-headers", lambda key: _request(b"GET /healthz HTTP/1.1" + b"\r\nX-A: 1" * 200), 431),
    ("bad-request-line", lambda key: b"GET / HTTP/9.9 extra\r\n\r\n", 400),
    ("tls-client-hello", lambda key: b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64), 400),
    ("binary", lambda key: bytes(range(256)) * 4, 400),
    ("nul-in-header", lambda key: _request(b"GET /healthz HTTP/1.1\r\nX-A: a\x00b"), 400),
    ("two-content-lengths", lambda key: _request(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 9"),
     400),
    ("bad-chunk-size", lambda key: CHUNKED + key.encode() + b"\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("request-id-not-utf8", lambda key: _request(b"POST /v1/chat/completions HTTP/1.1\r\nX-Request-ID: \xff",
     _json(chat_body()), key), 400),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make_request", "status"),
    [case[1:] for case in HOSTILE_REQUESTS],
    ids=[case[0] for case in HOSTILE_REQUESTS],
)
def test_malformed_http_gets_an_openai_error_while_others_are_served(server, make_request, status):
    request = make_request(server.demo.keys["acme"])
    with no_loop_stall(server.demo):
        results = asyncio.run(served_meanwhile(server, repeatedly(lambda: raw_exchange(server.url, request))))
    for got_status, body in results:
        assert got_status == status, body
        assert_openai_error(body)


async def _stream_text(server, body, path=CHAT) -> tuple[str, str | None]:
    headers = {"Authorization": f"Bearer {server.demo.keys['acme']}"}
    text, finish = [], None
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + path, json=body | {"stream": True}, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        async for line in response.content:
            data = line.decode().removeprefix("data: ").strip()
            if data and data != "[DONE]":
                choice = json.loads(data)["choices"][0]
                text.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_longest_stop_strings_allowed_hold_back_and_cut_correctly(server):
    """Four stop strings of the largest size allowed: one that matches everything generated so
    far (so all of it is held back until the end), and one that cuts the text. Nothing stalls,
    and the text is what a plain request gives, cut at the stop."""
    # A plain-text prompt: the demo model continues it for as long as it is let (its chats end).
    plain = {"model": "acme", "prompt": "The quick brown fox", "max_tokens": 120, "temperature": 0}
    full, finish = asyncio.run(_stream_text(server, plain, COMPLETIONS))
    assert finish == "length"
    assert 100 < len(full) < 1024, full  # the holding stop below must be longer than the text
    holding = (full + "\x00" * 1024)[:1024]  # every generated character could start this one
    cutting = full[60:70]
    stops = [holding, "\x01" * 1024, "\x02" * 1024, cutting]
    with no_loop_stall(server.demo):
        cut, finish = asyncio.run(
            served_meanwhile(server, _stream_text(server, plain | {"stop": stops}, COMPLETIONS))
        )
    assert (cut, finish) == (full[: full.find(cutting)], "stop")
    held, finish = asyncio.run(_stream_text(server, plain | {"stop": stops[:3]}, COMPLETIONS))
    assert (held, finish) == (full, "length")
