"""Function calling, at the text level and per model family: tools go to the model through its chat
template, and its answer is read back into OpenAI's `tool_calls`. One small pure module per family
(hermes.py, llama3_json.py, mistral.py); nothing here needs vLLM, so the llama.cpp fallback calls
tools the same way.

The family is the one whose format the base model's chat template writes, unless the config's
`tool_parser` names one. `tool_choice` "required" or a named function constrains the output with
the family's grammar (structured.py compiles it), so the call always parses and its arguments
match the function's parameters; "auto" lets the model choose, and what it writes is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...engines.base import Grammar
from ..structured import lark_json
from .base import Format, Literal, Tool
from .hermes import Hermes
from .llama3_json import Llama3Json
from .mistral import Mistral
from .reader import CallOut, Released, ToolCallReader

__all__ = ["FORMATS", "CallOut", "Format", "Released", "Tool", "ToolCallReader", "ToolCalling", "select"]

FORMATS: dict[str, Format] = {f.name: f for f in (Hermes(), Llama3Json(), Mistral())}
SETTINGS = ("auto", "none", *FORMATS)


def select(setting: str, chat_template: str | None) -> tuple[Format | None, str]:
    """The family to call tools with, and why (for the log); None: requests with tools are refused."""
    template = chat_template or ""
    if setting == "none":
        return None, "tool calling is off (tool_parser = none)"
    if "tools" not in template:
        return None, "the model's chat template does not render tools"
    if setting != "auto":
        return FORMATS[setting], f"tool calls in the {setting} format (tool_parser)"
    found = next((f for f in FORMATS.values() if f.matches(template)), None)
    if found is None:
        return None, "the model's chat template writes tool calls in no format lorabox reads: set tool_parser"
    return found, f"tool calls in the {found.name} format (from the model's chat template)"


@dataclass(frozen=True)
class ToolCalling:
    """A request's tools and how they may be called; `choice` is "none", "auto", "required" or a
    function's name."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {tool.name for tool in self.tools}

    @property
    def reads_calls(self) -> bool:
        return self.choice != "none"

    def grammar(self, format: Format, literal: Literal, content: dict[str, Any] | None) -> Grammar | None:
        """What the output must match: calls, when they are required or a function is named; under
        "auto" with a JSON schema for the content, that JSON or calls. None: nothing here (the
        content's own schema, if any, applies)."""
        if self.choice == "none" or (self.choice == "auto" and content is None):
            return None
        named = self.choice not in ("auto", "required")
        tools = [t for t in self.tools if t.name == self.choice] if named else list(self.tools)
        start = "start: tool_calls"
        if self.choice == "auto":
            start = f"start: content | tool_calls\ncontent: {lark_json(content or {})}"
        return Grammar("lark", f"{start}\n{format.grammar(tools, literal, self.parallel and not named)}")


def literal_for(tokenizer: Any) -> Literal:
    """Text as a Lark terminal: a special token of `tokenizer` by its id (the model writes it as one
    token, which matches no text), anything else as a quoted string."""
    special = set(getattr(tokenizer, "all_special_tokens", ())) | {
        token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special
    }

    def literal(text: str) -> str:
        if text in special:
            return f"<[{tokenizer.convert_tokens_to_ids(text)}]>"
        return json.dumps(text, ensure_ascii=False)

    return literal


def kept_tokens(format: Format | None, tokenizer: Any) -> frozenset[int]:
    """The ids of the family's markers that are special tokens: the detokenizer keeps them."""
    if format is None:
        return frozenset()
    literal = literal_for(tokenizer)
    special = [marker for marker in format.special if literal(marker).startswith("<[")]
    return frozenset(tokenizer.convert_tokens_to_ids(marker) for marker in special)
