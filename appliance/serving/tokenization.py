"""Prompts to token ids and token ids back to text, the same way whichever engine runs.

The server owns the tokenizer: engines receive token ids and return token ids. That keeps
chat templates, stop strings and streaming text identical across vLLM and llama.cpp, and lets
tests compare tokens with a Hugging Face reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class PromptError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


class TextCodec:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_token_ids: tuple[int, ...] = (eos,) if isinstance(eos, int) else tuple(eos or ())

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> TextCodec:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir))

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises on roles or shapes a template refuses
            raise PromptError(f"messages cannot be rendered by the model's chat template: {exc}") from exc
        # The template writes the special tokens itself.
        return list(self.tokenizer(rendered, add_special_tokens=False).input_ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)


@dataclass
class Detokenizer:
    """Incremental decoding: text is released only once it can no longer change.

    Decoding a window that starts a few tokens back keeps merges and leading spaces right, and
    a trailing U+FFFD means a multi-byte character is still incomplete, so it is held back.
    The concatenation of all deltas equals `decode(all tokens)`.
    """

    codec: TextCodec
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    _prefix_offset: int = 0
    _read_offset: int = 0

    def feed(self, new_ids: list[int]) -> str:
        self.token_ids.extend(new_ids)
        prefix = self.codec.decode(self.token_ids[self._prefix_offset : self._read_offset])
        window = self.codec.decode(self.token_ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """Whatever was held back, so that the whole output is exactly decode(all tokens)."""
        full = self.codec.decode(self.token_ids)
        delta = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


@dataclass
class StopMatcher:
    """Cuts the text at the first stop string, holding back what could be the start of one."""

    stops: tuple[str, ...]
    _pending: str = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, stopped)."""
        if not self.stops:
            return text, False
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending
