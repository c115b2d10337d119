"""Mistral calls: `[TOOL_CALLS]` (a special token, kept) then either a JSON array of calls (v3/v7
tokenizers) or one function's name, `[ARGS]` and its arguments (v11 and later, one per marker).
The text before the marker is the message's content.

    [TOOL_CALLS][{"name": "track_parcel", "arguments": {"order_id": "12345"}}]
    [TOOL_CALLS]track_parcel[ARGS]{"order_id": "12345"}
"""

from __future__ import annotations

import json
from typing import Any

from ..structured import lark_json
from .base import JsonScanner, Literal, ParsedCall, Taken, Tool, call_at, call_schema, skip_space

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class Mistral:
    name: str = "mistral"
    markers: tuple[str, ...] = (TOOL_CALLS,)
    at_start_only: bool = False
    separators: str = " \t\r\n"
    special: tuple[str, ...] = (TOOL_CALLS, ARGS)

    def matches(self, chat_template: str) -> bool:
        return TOOL_CALLS in chat_template

    def take(self, region: str, final: bool, names: set[str], scanner: JsonScanner) -> Taken | None:
        start = skip_space(region, len(TOOL_CALLS))
        if start == len(region):
            return None if final else Taken([], 0)
        if region[start] == "[" and not region.startswith(ARGS, start):
            return self._array(region, start, final, names, scanner)
        return self._named(region, start, final, names, scanner)

    def _array(
        self, region: str, start: int, final: bool, names: set[str], scanner: JsonScanner
    ) -> Taken | None:
        end = scanner.end(region, start)
        if end is None:
            return None if final else Taken([], 0)
        try:
            items = json.loads(region[start:end])
        except ValueError:
            return None
        if not isinstance(items, list) or not items:
            return None
        calls, index = [], skip_space(region, start + 1)
        for _ in items:
            item_end = scanner.end(region, index) if region[index] == "{" else None
            call = call_at(region, index, item_end, "arguments", names) if item_end else None
            if call is None:
                return None
            calls.append(call)
            index = skip_space(region, item_end)  # type: ignore[arg-type]
            index = skip_space(region, index + 1) if region[index] == "," else index
        return Taken(calls, end)

    def _named(
        self, region: str, start: int, final: bool, names: set[str], scanner: JsonScanner
    ) -> Taken | None:
        args = region.find(ARGS, start)
        if args < 0:
            if final or len(region) - start > max(map(len, names), default=0) + len(ARGS):
                return None
            return Taken([], 0)
        name = region[start:args].strip()
        body = skip_space(region, args + len(ARGS))
        if name not in names:
            return None
        end = scanner.object_end(region, body, final)
        if not isinstance(end, int):
            return end
        try:
            arguments = json.loads(region[body:end])
        except ValueError:
            return None
        return Taken([ParsedCall(name, (body, end))], end) if isinstance(arguments, dict) else None

    def grammar(self, tools: list[Tool], literal: Literal, parallel: bool) -> str:
        items = {"anyOf": [call_schema(tool, "arguments") for tool in tools]}
        calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        calls |= {} if parallel else {"maxItems": 1}
        return f"tool_calls: {literal(TOOL_CALLS)} calls\ncalls: {lark_json(calls)}"
