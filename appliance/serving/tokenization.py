"""Prompts to token ids and token ids back to text, the same way whichever engine runs.

The server owns the tokenizer: engines receive token ids and return token ids. That keeps
chat templates, stop strings and streaming text identical across vLLM and llama.cpp, and lets
tests compare tokens with a Hugging Face reference exactly.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPLACEMENT_CHAR = "\ufffd"
_Input = TypeVar("_Input")


class PromptError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


class TextCodec:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_token_ids: tuple[int, ...] = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self._llg: Any = None
        self._llg_lock = threading.Lock()
        self._decode = _backend_decode(tokenizer)

    def llg_tokenizer(self) -> Any:
        """The tokenizer as llguidance sees it (grammars, and each token's bytes), built on first
        use: about 1 s for a 128k vocabulary, so the daemon builds it before it serves."""
        with self._llg_lock:
            if self._llg is None:
                import llguidance.hf

                self._llg = llguidance.hf.from_tokenizer(self.tokenizer)
            return self._llg

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (part of a character, for some tokens of byte-level BPE)."""
        return bytes(self.llg_tokenizer().decode_bytes([token_id]))

    def token_text(self, token_id: int) -> str:
        """A token as text for logprobs; one that is not whole UTF-8 reads "bytes:\\x..", as vLLM's."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> TextCodec:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir))

    def encode_prompt(self, text: str, limit: int | None = None) -> list[int]:
        """The prompt's ids; only the first `limit` of them when it has more."""
        return self._ids(text, limit, add_special_tokens=True)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        limit: int | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The ids of the messages (and tools, if any) rendered by the chat template; only the first
        `limit` of them."""
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises on roles or shapes a template refuses
            raise PromptError(f"messages cannot be rendered by the model's chat template: {exc}") from exc
        # The template writes the special tokens itself.
        return self._ids(rendered, limit, add_special_tokens=False)

    def _ids(self, text: str, limit: int | None, add_special_tokens: bool) -> list[int]:
        # Ids past a limit that no prompt can reach are not worth turning into a Python list: for a
        # 1 MiB prompt that alone holds the GIL (so the event loop) for tens of ms.
        encoded = self.tokenizer(
            text, add_special_tokens=add_special_tokens, truncation=limit is not None, max_length=limit
        )
        return list(encoded.input_ids)

    def decode(self, token_ids: list[int], keep: frozenset[int] = frozenset()) -> str:
        """The text of the ids, without special tokens but those in `keep` (a tool-call marker)."""
        if not keep.intersection(token_ids):
            return self._decode(token_ids)
        parts, start = [], 0
        for index, token in enumerate(token_ids):
            if token in keep:
                parts.append(self.tokenizer.decode(token_ids[start:index], skip_special_tokens=True))
                parts.append(self.tokenizer.convert_ids_to_tokens(token))
                start = index + 1
        parts.append(self.tokenizer.decode(token_ids[start:], skip_special_tokens=True))
        return "".join(parts)

    def detokenizer(self, keep: frozenset[int] = frozenset()) -> Detokenizer:
        return Detokenizer(self, keep)


def _backend_decode(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight from the Rust tokenizer where that
    is the same: transformers' own wrapper around it cost the detokenizer two thirds of its time
    (streams decode every token twice). A slow tokenizer, or one whose decode cleans up spaces
    after the Rust one, goes through transformers as before."""

    def wrapped(token_ids: list[int]) -> str:
        return str(tokenizer.decode(token_ids, skip_special_tokens=True))

    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return wrapped
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers 5 skips that clean-up for BPE models unless told to corrupt the output;
        # older versions (no such flag) clean up.
        corrupt = getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None
        )
        if corrupt is None or corrupt or type(backend.model).__name__ != "BPE":
            return wrapped
    rust_decode = backend.decode
    return lambda token_ids: str(rust_decode(token_ids, skip_special_tokens=True))


class PromptEncoder:
    """Renders and tokenizes prompts without holding up the event loop.

    Tokenizing is linear in the text but not cheap: with the demo tokenizer about 0.5-1.7 µs a
    character, so a 1 MiB prompt takes up to 1.7 s. Short prompts, the common case, are encoded in
    place (a few ms at most); longer ones on a small pool of threads, where the tokenizer (Rust)
    runs without the GIL. The pool is bounded, to half the cores (at most 4), so that large
    prompts leave cores to the engine and the event loop, and short prompts never queue behind them.
    """

    INLINE_CHARS = 4096
    MESSAGE_CHARS = 16  # what the chat template adds per message, roughly, counted as text

    def __init__(self, codec: TextCodec, threads: int = max(1, min(4, (os.cpu_count() or 2) // 2))):
        self.codec = codec
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lorabox-tokenize")

    async def chat(
        self,
        messages: list[dict[str, Any]],
        limit: int,
        system_prompt: str = "",
        tools: list[dict[str, Any]] | None = None,
        size: int | None = None,
    ) -> list[int]:
        """As `TextCodec.encode_chat`: at most `limit` ids. A `system_prompt` (the tenant's, set by
        the operator) goes first, before the client's own system message if it sent one. `size`:
        the characters of the messages' and tools' text, as the request parser counted them
        (default: the messages' contents)."""
        if size is None:
            size = sum(len(m.get("content") or "") for m in messages)
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        size += len(system_prompt) + self.MESSAGE_CHARS * len(messages)
        return await self._encode(size, lambda m, n: self.codec.encode_chat(m, n, tools), messages, limit)

    async def prompt(self, text: str, limit: int) -> list[int]:
        """As `TextCodec.encode_prompt`: at most `limit` ids."""
        return await self._encode(len(text), self.codec.encode_prompt, text, limit)

    async def _encode(
        self, size: int, encode: Callable[[_Input, int], list[int]], what: _Input, limit: int
    ) -> list[int]:
        if size <= self.INLINE_CHARS:
            return encode(what, limit)
        return await asyncio.get_running_loop().run_in_executor(self._pool, encode, what, limit)


@dataclass
class Detokenizer:
    """Incremental decoding: text is released only once it can no longer change.

    Decoding a window that starts a few tokens back keeps merges and leading spaces right, and
    a trailing U+FFFD means a multi-byte character is still incomplete, so it is held back.
    The concatenation of all deltas equals `decode(all tokens)`.
    """

    codec: TextCodec
    keep: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    _prefix_offset: int = 0
    _read_offset: int = 0

    def feed(self, new_ids: list[int]) -> str:
        self.token_ids.extend(new_ids)
        prefix = self.codec.decode(self.token_ids[self._prefix_offset : self._read_offset], self.keep)
        window = self.codec.decode(self.token_ids[self._prefix_offset :], self.keep)
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """Whatever was held back, so that the whole output is exactly decode(all tokens)."""
        full = self.codec.decode(self.token_ids, self.keep)
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
