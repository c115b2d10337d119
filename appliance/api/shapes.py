"""The JSON of responses and stream chunks, exactly as OpenAI's (the `openai` package's types):
choices, logprobs (chat's `content` entries with `bytes`; completions' tokens, token_logprobs,
top_logprobs and text_offset) and tool calls (streamed: a call's first delta carries its index,
id, type, name and empty arguments, the next ones fragments of its arguments)."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from ..engines.base import TokenLogprob
from ..serving.generator import GenerationResult, TextChunk
from ..serving.tokenization import TextCodec
from ..serving.tools import CallOut

UNLIKELY = -9999.0  # OpenAI's logprob for a token that cannot follow (JSON has no -inf)
_TEXT = "\0text\0"  # where a chunk's text goes in its template: JSON writes NUL escaped, nothing else has it


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: ` and the payload's JSON (or the string as is: [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@dataclass
class Collected:
    """One choice of a non-streamed response, gathered from its chunks."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: list[CallOut] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, chunk: TextChunk) -> None:
        self.text += chunk.text
        self.logprobs += chunk.logprobs
        self.calls += chunk.calls
        self.finish_reason = chunk.finish_reason or self.finish_reason


class Shape:
    """One response's JSON: its id, and how its choices and chunks are written."""

    def __init__(
        self, chat: bool, model: str, codec: TextCodec, logprobs: bool, service_tier: str | None = None
    ):
        self.chat, self.model, self.codec, self.logprobs = chat, model, codec, logprobs
        self.service_tier = service_tier  # said in every body and chunk when the request asked for one
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions' text_offset, per choice
        self._templates: dict[int, tuple[bytes, bytes]] = {}  # text_event's, per choice

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        } | ({"service_tier": self.service_tier} if self.service_tier else {})

    def body(self, choices: dict[int, Collected], result: GenerationResult) -> dict[str, Any]:
        rendered = []
        for index in sorted(choices):
            collected = choices[index]
            choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, collected.logprobs)}
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": collected.text}
                if collected.calls:
                    message["content"] = collected.text if collected.text.strip() else None
                    message["tool_calls"] = [_call(call) for call in collected.calls]
                choice["message"] = message
            else:
                choice["text"] = collected.text
            choice["finish_reason"] = collected.finish_reason
            rendered.append(choice)
        return self._envelope(rendered, chunk=False) | {"usage": result.usage}

    def first(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk of a choice: the role."""
        return self._chunk(index, {"role": "assistant", "content": ""})

    def chunks(self, chunk: TextChunk) -> list[dict[str, Any]]:
        """What one chunk of a choice streams as: its text (with its tokens' logprobs), each call
        complete in it (its head, then its arguments' fragments), then its finish reason."""
        out: list[dict[str, Any]] = []
        if chunk.text or chunk.logprobs:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
            out.append(self._chunk(chunk.index, delta, logprobs=chunk.logprobs))
        for call in chunk.calls:
            head = {"index": call.index, "id": call.id, "type": "function"}
            head["function"] = {"name": call.name, "arguments": ""}
            out.append(self._chunk(chunk.index, {"tool_calls": [head]}))
            for fragment in call.fragments:
                piece = {"index": call.index, "function": {"arguments": fragment}}
                out.append(self._chunk(chunk.index, {"tool_calls": [piece]}))
        if chunk.finish_reason:
            out.append(self._chunk(chunk.index, {}, finish_reason=chunk.finish_reason))
        return out

    def text_event(self, chunk: TextChunk, extra: dict[str, Any]) -> bytes | None:
        """The event of a chunk of text alone (nearly every chunk), the same bytes as
        `sse(self.chunks(chunk)[0] | extra)`, from a template made once per choice: building and
        encoding each token's whole chunk was a tenth of the daemon's time under streamed load.
        None for any other chunk (logprobs, calls, a finish reason)."""
        if not chunk.text or chunk.logprobs or chunk.calls or chunk.finish_reason or self.logprobs:
            return None
        template = self._templates.get(chunk.index)
        if template is None:
            head, _, tail = sse(self._chunk(chunk.index, {"content": _TEXT}) | extra).partition(
                encode_basestring(_TEXT).encode()
            )
            template = self._templates[chunk.index] = (head, tail)
        return template[0] + encode_basestring(chunk.text).encode() + template[1]

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        # A chunk without tokens of its own (the role, the finish reason) carries no logprobs.
        entries = self._logprobs(index, logprobs) if logprobs else None
        choice: dict[str, Any] = {"index": index, "logprobs": entries}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        choice["finish_reason"] = finish_reason
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return self._envelope([], chunk=True) | {"usage": result.usage}

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        text = self.codec.token_text
        if self.chat:
            return {
                "content": [
                    self._token(e.token_id, e.logprob)
                    | {"top_logprobs": [self._token(token, logprob) for token, logprob in e.top]}
                    for e in entries
                ],
                "refusal": None,
            }
        tokens = [text(e.token_id) for e in entries]
        offsets, offset = [], self._offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [{text(token): _finite(lp) for token, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": self.codec.token_text(token_id),
            "logprob": _finite(logprob),
            "bytes": list(self.codec.token_bytes(token_id)),
        }


def _call(call: CallOut) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else UNLIKELY
