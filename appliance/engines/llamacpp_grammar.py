"""Grammars for the llama.cpp engine: llguidance matchers over the model's own vocabulary.

The same library, version and grammar text as vLLM's guidance backend, so a grammar constrains the
same way on both engines. Building a matcher does the grammar's expensive work (a few ms for a
50-property schema, up to the server's bound for a large one): it happens off the event loop and
off the decode thread, once per grammar; each request then takes a copy of the compiled one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

from .base import Grammar

CACHED_GRAMMARS = 64


class GrammarError(ValueError):
    """llguidance refused the grammar (the server checks grammars first: this means a bug)."""


class MatcherCache:
    def __init__(self, vocab: Any, size: int = CACHED_GRAMMARS):
        self._vocab = vocab
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._compiling: dict[str, asyncio.Task[Any]] = {}
        self._size = size

    async def matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher for one request, at the grammar's start."""
        template: Any = self._compiled.get(grammar.key)
        if template is None:
            task = self._compiling.get(grammar.key)
            if task is None:  # concurrent first requests of one grammar share its compilation
                task = asyncio.ensure_future(asyncio.to_thread(self._compile, grammar))
                self._compiling[grammar.key] = task
            try:
                template = await asyncio.shield(task)
            finally:
                if task.done():
                    self._compiling.pop(grammar.key, None)
            self._compiled[grammar.key] = template
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar.key)
        return template.deep_copy()

    def _compile(self, grammar: Grammar) -> Any:
        from llguidance import LLMatcher

        matcher = LLMatcher(self._llg_tokenizer(), grammar.serialized(), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def _llg_tokenizer(self) -> Any:
        # Built once, on first use (about 1 s for a 128k vocabulary); read-only afterwards. Its
        # end of sequence is the model's (what the GGUF says, as the server's tokenizer does).
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                self._tokenizer = lltokenizer_from_vocab(self._vocab)
            return self._tokenizer
