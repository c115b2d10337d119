"""Hermes-style calls (Qwen2.5, Qwen3, Hermes 2/3, the lorabox demo): each call one JSON object
between tags, the text before them the message's content.

    <tool_call>
    {"name": "track_parcel", "arguments": {"order_id": "12345"}}
    </tool_call>
"""

from __future__ import annotations

from ..structured import lark_json
from .base import JsonScanner, Literal, Taken, Tool, call_at, call_schema, skip_space

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class Hermes:
    name: str = "hermes"
    markers: tuple[str, ...] = (OPEN,)
    at_start_only: bool = False
    separators: str = " \t\r\n"
    special: tuple[str, ...] = ()  # Qwen's <tool_call> is an added token, but not a special one

    def matches(self, chat_template: str) -> bool:
        return OPEN in chat_template

    def take(self, region: str, final: bool, names: set[str], scanner: JsonScanner) -> Taken | None:
        start = skip_space(region, len(OPEN))
        end = scanner.object_end(region, start, final)
        if not isinstance(end, int):
            return end
        close = skip_space(region, end)
        if not region.startswith(CLOSE, close):
            if final or len(region) - close >= len(CLOSE) or not CLOSE.startswith(region[close:]):
                return None
            return Taken([], 0)
        call = call_at(region, start, end, "arguments", names)
        return Taken([call], close + len(CLOSE)) if call else None

    def grammar(self, tools: list[Tool], literal: Literal, parallel: bool) -> str:
        calls = {"anyOf": [call_schema(tool, "arguments") for tool in tools]}
        repeat = ' ("\\n" call)*' if parallel else ""
        return "\n".join(
            [
                f"tool_calls: call{repeat}",
                f'call: {literal(OPEN)} "\\n" body "\\n" {literal(CLOSE)}',
                f"body: {lark_json(calls)}",
            ]
        )
