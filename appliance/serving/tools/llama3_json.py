"""Llama 3.1 / 3.2 JSON calls: the whole answer is the call, one JSON object (several separated by
";"), its arguments under "parameters"; `<|python_tag|>` may come first (a special token, kept).

    {"name": "track_parcel", "parameters": {"order_id": "12345"}}
"""

from __future__ import annotations

from ..structured import lark_json
from .base import JsonScanner, Literal, Taken, Tool, call_at, call_schema, skip_space

PYTHON_TAG = "<|python_tag|>"


class Llama3Json:
    name: str = "llama3_json"
    markers: tuple[str, ...] = (PYTHON_TAG, "{")
    at_start_only: bool = True  # a brace later in an answer is prose, not a call
    separators: str = " \t\r\n;"
    special: tuple[str, ...] = (PYTHON_TAG,)

    def matches(self, chat_template: str) -> bool:
        return PYTHON_TAG in chat_template or "respond with a JSON for a function call" in chat_template

    def take(self, region: str, final: bool, names: set[str], scanner: JsonScanner) -> Taken | None:
        start = skip_space(region, len(PYTHON_TAG)) if region.startswith(PYTHON_TAG) else 0
        end = scanner.object_end(region, start, final)
        if not isinstance(end, int):
            return end
        # Llama 3.1 documents "parameters"; some fine-tunes write "arguments".
        call = call_at(region, start, end, "parameters", names)
        call = call or call_at(region, start, end, "arguments", names)
        return Taken([call], end) if call else None

    def grammar(self, tools: list[Tool], literal: Literal, parallel: bool) -> str:
        calls = {"anyOf": [call_schema(tool, "parameters") for tool in tools]}
        repeat = ' ("; " call)*' if parallel else ""
        return f"tool_calls: call{repeat}\ncall: {lark_json(calls)}"
