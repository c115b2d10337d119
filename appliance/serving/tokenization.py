"""Prompts to token ids and token ids back to text, the same way whichever engine runs.

The server owns the tokenizer: engines receive token ids and return token ids. That keeps
chat templates, stop strings and streaming text identical across vLLM and llama.cpp, and lets
tests compare tokens with a Hugging Face reference exactly.
"""

from __future__ import annotations

from collections import deque
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


class _StopString:
    """Knuth-Morris-Pratt matching of one stop string, one character at a time.

    `matched` is the length of the longest suffix of the text seen so far that is a prefix of the
    stop string; it reaching `len(text)` means the stop string has just been completed. Each
    character costs amortised O(1), however long the stop string.
    """

    def __init__(self, text: str):
        if not text:
            raise ValueError("a stop string cannot be empty")
        self.text = text
        self.matched = 0
        # fallback[i]: length of the longest proper prefix of text[:i + 1] that is also its suffix.
        self._fallback = [0] * len(text)
        k = 0
        for i in range(1, len(text)):
            while k and text[i] != text[k]:
                k = self._fallback[k - 1]
            if text[i] == text[k]:
                k += 1
            self._fallback[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string ends with it."""
        k, text = self.matched, self.text
        while k and text[k] != char:
            k = self._fallback[k - 1]
        if text[k] == char:
            k += 1
        self.matched = k
        return k == len(text)


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back what could be the start of one.

    The text is cut where a stop string is first completed (the earliest end; of stop strings
    ending at the same character, the longest wins), which is what checking after every character
    would give, and does not depend on how the text is split into pushes. The concatenation of
    everything released is the full text cut there. Work is linear in the text pushed: each stop
    string is matched by its own automaton, and the held-back characters wait in a deque. Once
    it has reported a stop, the matcher is done.
    """

    def __init__(self, stops: tuple[str, ...]):
        self._stops = [_StopString(s) for s in stops]
        self._held: deque[str] = deque()

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, stopped)."""
        if not self._stops:
            return text, False
        held = self._held
        for char in text:
            held.append(char)
            completed = [s for s in self._stops if s.feed(char)]  # every automaton sees every char
            if completed:
                text = self._release(len(held) - max(len(s.text) for s in completed))
                held.clear()
                return text, True
        # What no stop string can still start in is safe to send.
        return self._release(len(held) - max(s.matched for s in self._stops)), False

    def _release(self, count: int) -> str:
        popleft = self._held.popleft
        return "".join([popleft() for _ in range(count)])

    def flush(self) -> str:
        held = "".join(self._held)
        self._held.clear()
        return held
