"""Structured outputs: the grammar a request's output must match, checked before the engine runs it.

Rule. A JSON schema or tool list is tenant input: what it costs is bounded before any of it runs.
    1. The schema is a JSON object of at most MAX_SCHEMA_BYTES (compact) nested at most
       MAX_SCHEMA_DEPTH deep: checked in Python, linear in the bytes already read.
    2. llguidance compiles it (the library, version and settings both engines use, so a grammar
       that passes here is enforced there), on a small pool of threads, never on the event loop,
       one compilation per tenant at a time (a tenant's next waits for its previous), bounded by
       COMPILE_TIMEOUT_S from the moment it asks. A schema llguidance cannot enforce (an
       unsupported keyword, an unsatisfiable schema, a grammar past its limits) or one that took
       too long is refused with the reason; the verdict, either way, is kept per grammar (sha256)
       in a bounded LRU, so the same schema costs one compilation.
Bound. Measured on 2 cores (demo vocabulary): a 50-property schema compiles in 5 ms; within the
caps the slowest found (about 1,100 optional properties) in 0.4 s. One tenant holds at most one of
the pool's threads; its other requests wait for it, then fail their own time bound.
Knob. COMPILE_TIMEOUT_S.

JSON is written in one style, the way Python's json.dumps writes it (", " and ": ", no other
whitespace): what chat templates show models, and no room for a small model to wander off into
whitespace.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..engines.base import Grammar

MAX_SCHEMA_BYTES = 32 * 1024
MAX_SCHEMA_DEPTH = 64  # as vLLM's limit on a schema's nesting
COMPILE_TIMEOUT_S = 2.0
CACHED_VERDICTS = 512
MAX_REASON_CHARS = 300
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarRefused(ValueError):
    """The grammar cannot be enforced, or not within the bounds; the message says why."""


def check_schema(schema: Any, where: str) -> dict[str, Any]:
    """`schema` if it is a JSON object within the size and nesting caps; `where` names it."""
    if not isinstance(schema, dict):
        raise GrammarRefused(f"{where} must be a JSON object (a JSON schema).")
    if _depth(schema) > MAX_SCHEMA_DEPTH:  # first: json.dumps recurses
        raise GrammarRefused(f"{where} is nested too deeply: at most {MAX_SCHEMA_DEPTH} levels are accepted.")
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise GrammarRefused(f"{where} is too large: {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted.")
    return schema


def _depth(value: Any) -> int:
    # Iterative: a body of 1 MiB can nest far deeper than Python's recursion limit.
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_SCHEMA_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def styled(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with lorabox's JSON style as its llguidance options (`x-guidance`)."""
    return {**schema, "x-guidance": JSON_STYLE}


def json_schema_grammar(schema: dict[str, Any]) -> Grammar:
    return Grammar("json_schema", json.dumps(styled(schema), ensure_ascii=False))


def lark_json(schema: dict[str, Any]) -> str:
    """A schema as a Lark grammar's rule body (llguidance's `%json`)."""
    return "%json " + json.dumps(styled(schema), ensure_ascii=False)


class GrammarCompiler:
    """Checks grammars with llguidance off the event loop (see the module's rule)."""

    def __init__(
        self,
        tokenizer: Callable[[], Any],
        timeout_s: float = COMPILE_TIMEOUT_S,
        threads: int = max(1, min(2, (os.cpu_count() or 2) // 2)),
        cached: int = CACHED_VERDICTS,
    ):
        self._tokenizer = tokenizer  # the server's llguidance tokenizer (TextCodec.llg_tokenizer)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lorabox-grammar")
        self._verdicts: OrderedDict[str, str] = OrderedDict()  # grammar key -> "" (fine) or the reason
        self._owners: dict[str, asyncio.Lock] = {}  # one per tenant (their number is the operator's)
        self._cached = cached
        self.compilations = 0

    async def check(self, grammar: Grammar, owner: str) -> None:
        """Return if the grammar can be enforced; raise GrammarRefused with the reason if not.
        `owner` (the tenant) compiles one grammar at a time."""
        verdict = self._verdict(grammar.key)
        if verdict is None:
            verdict = await self._compile(grammar, owner)
        if verdict:
            raise GrammarRefused(verdict)

    def _verdict(self, key: str) -> str | None:
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
        return verdict

    def _remember(self, key: str, verdict: str) -> str:
        self._verdicts[key] = verdict
        while len(self._verdicts) > self._cached:
            self._verdicts.popitem(last=False)
        return verdict

    async def _compile(self, grammar: Grammar, owner: str) -> str:
        lock = self._owners.setdefault(owner, asyncio.Lock())
        future = None
        try:
            async with asyncio.timeout(self.timeout_s):
                async with lock:
                    verdict = self._verdict(grammar.key)  # compiled while this one waited
                    if verdict is not None:
                        return verdict
                    future = self._pool.submit(self._run, grammar)
                    return self._remember(grammar.key, await asyncio.wrap_future(future))
        except TimeoutError:
            if future is None or future.cancel():  # still waiting for its turn: it never runs
                return f"it waited longer than {self.timeout_s:g} s to be compiled; retry"
            # Already compiling: it finishes on its thread, but its verdict is this one, for good:
            # a grammar this costly would cost the engine as much.
            return self._remember(grammar.key, f"it takes longer than {self.timeout_s:g} s to compile")

    def _run(self, grammar: Grammar) -> str:
        """Compile on a pool thread (llguidance releases the GIL while it builds); "" or why not."""
        from llguidance import LLMatcher, LLParserLimits

        self.compilations += 1
        try:
            serialized = grammar.serialized()
        except (ValueError, TypeError) as exc:
            return _reason(str(exc))
        matcher = LLMatcher(
            self._tokenizer(), serialized, log_level=0, limits=LLParserLimits(verbose_errors=False)
        )
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first step: some grammars fail only here (nothing fits)
        if matcher.is_error():
            return _reason(matcher.get_error())
        return ""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _reason(error: str) -> str:
    text = " ".join(error.split())
    if text in ("NoExtension", "NoExtensionBias") or text.startswith("NoExtension"):
        return "no output can satisfy it"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
