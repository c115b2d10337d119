"""What every tool-call format shares: the tools a request offers, the calls a model makes, and
the JSON scanning the format parsers need. Text only: nothing here knows of an engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"


@dataclass(frozen=True)
class Tool:
    """A function the request offers the model (OpenAI's `tools[i]`)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    """Its arguments' JSON schema; empty: it takes none."""
    sent: dict[str, Any] = field(default_factory=dict)
    """The tool as the client sent it, for the chat template."""

    @property
    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ParsedCall:
    """One call found in the model's text: the function's name, and where its arguments (a JSON
    object, as the model wrote it) lie in the text handed to the parser."""

    name: str
    arguments: tuple[int, int]


@dataclass(frozen=True)
class Taken:
    """Calls complete at the start of a region, and the characters they took (0: none yet)."""

    calls: list[ParsedCall]
    used: int


Literal = Callable[[str], str]
"""A piece of text as a Lark terminal: a quoted string, or a special token by its id."""


class Format(Protocol):
    """One model family's way of writing tool calls."""

    name: str
    markers: tuple[str, ...]
    """Text that opens a call."""
    at_start_only: bool
    """A marker opens calls only as the first thing the model writes (after spaces)."""
    separators: str
    """Characters allowed between two calls."""
    special: tuple[str, ...]
    """Markers its models have as special tokens, which the detokenizer must keep in the text."""

    def matches(self, chat_template: str) -> bool:
        """Whether a chat template is this family's (it renders tools this way)."""
        ...

    def take(self, region: str, final: bool, names: set[str], scanner: JsonScanner) -> Taken | None:
        """`region` starts with a marker: the calls (to functions in `names`) complete at its
        start. None when it is not a call in this format (broken JSON, an unknown function, a
        call unfinished at the end): then it is text. `scanner` belongs to this region."""
        ...

    def grammar(self, tools: list[Tool], literal: Literal, parallel: bool) -> str:
        """Lark rules (llguidance) whose rule `tool_calls` is one call, or several with `parallel`,
        to `tools`."""
        ...


class JsonScanner:
    """Finds where a JSON object or array ends in a text that only grows, resuming where it
    stopped: streamed text is scanned once, however often a parser looks. Counts brackets
    outside strings; it does not check the JSON (json.loads does, once it has ended)."""

    def __init__(self) -> None:
        self._state: dict[int, tuple[int, int, bool, bool]] = {}  # start -> index, depth, string, escape

    def end(self, text: str, start: int) -> int | None:
        """The index after the value opening at text[start], or None while it is not closed."""
        index, depth, in_string, escaped = self._state.get(start, (start, 0, False, False))
        for index in range(index, len(text)):  # noqa: B020 (resumes from the saved index)
            char = text[index]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    self._state.pop(start, None)
                    return index + 1
        self._state[start] = (len(text), depth, in_string, escaped)
        return None

    def object_end(self, text: str, start: int, final: bool) -> int | Taken | None:
        """The index after the JSON object opening at text[start]; else `Taken([], 0)` while more
        text may still make one (nothing, or an open object, there yet), None when it cannot."""
        if start == len(text):
            return None if final else Taken([], 0)
        if text[start] != "{":
            return None
        end = self.end(text, start)
        if end is None:
            return None if final else Taken([], 0)
        return end


def skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in _SPACE:
        index += 1
    return index


def members(text: str, start: int) -> dict[str, tuple[int, int]]:
    """The spans of the values of the JSON object at `text[start]` (which must be valid JSON)."""
    spans: dict[str, tuple[int, int]] = {}
    index = skip_space(text, start + 1)
    while text[index] != "}":
        key, index = _DECODER.raw_decode(text, index)
        index = skip_space(text, skip_space(text, index) + 1)  # past the colon
        _, end = _DECODER.raw_decode(text, index)
        spans[key] = (index, end)
        index = skip_space(text, end)
        if text[index] == ",":
            index = skip_space(text, index + 1)
    return spans


def call_at(text: str, start: int, end: int, arguments_key: str, names: set[str]) -> ParsedCall | None:
    """The call written as the JSON object text[start:end] ({"name": ..., <arguments_key>: {...}}),
    or None when it is not one (not JSON, no such function, arguments not an object)."""
    try:
        value = json.loads(text[start:end])
    except ValueError:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("name"), str)
        or value["name"] not in names
        or not isinstance(value.get(arguments_key), dict)
    ):
        return None
    return ParsedCall(value["name"], members(text, start)[arguments_key])


def call_schema(tool: Tool, arguments_key: str) -> dict[str, Any]:
    """The JSON schema of one call object to `tool`: its name, then its arguments."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: tool.arguments_schema},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }
