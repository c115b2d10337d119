"""Parse and check OpenAI request bodies. Every rejection names the offending parameter.

Unknown fields are ignored, as OpenAI-compatible servers commonly do, so newer clients keep
working. Known fields this server cannot honour are refused rather than silently dropped, and
`cache_salt` is refused outright: the server sets it per tenant, a client never does.

What one request may ask for is bounded (README, "Using it"): the server's work for a request
(holding back and matching stop strings, rendering and tokenizing the prompt) is proportional to
these limits, never to more. Every string used must be valid Unicode: JSON can carry lone
surrogates (`"\\ud800"`), which the tokenizer, SQLite and the response encoder all refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..serving.generator import SamplingOptions
from .errors import APIError, bad_request

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # per stop string; what could be its start is held back from the stream
MAX_MESSAGES = 4096
MAX_PROMPT_SIZE = 1 << 20  # characters of all messages' text together, or of the prompt (or its token ids)
CHAT_ROLES = ("system", "developer", "user", "assistant")
# Fields we recognise but do not implement: refusing beats silently ignoring them.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs",
               "response_format", "best_of", "echo", "suffix", "logit_bias", "audio", "modalities",
               "prediction")  # fmt: skip
SERVER_OWNED = ("cache_salt", "lora_request", "lora")


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    options: SamplingOptions
    stream: bool
    include_usage: bool
    user: str | None
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | list[int] | None = None  # completions


def _text(value: str, param: str, where: str | None = None) -> str:
    """`value`, if it is valid Unicode text (encodable as UTF-8); `where` names it in the message."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise bad_request(
                f"{where or repr(param)} is not valid Unicode: it contains an unpaired surrogate "
                f"(\\u{ord(value[exc.start]):04x} at character {exc.start}).",
                param,
            ) from exc
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:  # type: ignore[type-arg]
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' must be a number.", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {value}.", name)
    return float(value)


def _optional_int(body: dict, name: str, low: int, high: int) -> int | None:  # type: ignore[type-arg]
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer.", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {value}.", name)
    return value


def _common(body: Any) -> tuple[str, SamplingOptions, bool, bool, str | None]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    for name in SERVER_OWNED:
        if name in body:
            raise bad_request(f"'{name}' is set by the server and cannot be sent by clients.", name)
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise bad_request(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", "model")
    _text(model, "model")
    _optional_int(body, "n", 1, 1)  # only one choice per request
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(
                f"'{penalty}' is not supported by this server.", penalty, "unsupported_parameter"
            )

    max_tokens = _optional_int(body, "max_completion_tokens", 1, 1 << 30)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, 1 << 30)
    options = SamplingOptions(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=_optional_int(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop=_stops(body.get("stop")),
    )

    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be a boolean.", "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_request("'stream_options' must be an object.", "stream_options")
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad_request("'stream_options.include_usage' must be a boolean.", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string.", "user")
    if user is not None:
        _text(user, "user")
    return model, options, bool(stream), include_usage, user


def _stops(stop: Any) -> tuple[str, ...]:
    """The non-empty stop strings of `stop` (a string, a list of strings, or null)."""
    if stop is None:
        return ()
    listed = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(listed, list)
        or len(listed) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) for s in listed)
    ):
        raise bad_request(f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} strings.", "stop")
    for s in listed:
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(
                f"Each 'stop' string may have at most {MAX_STOP_CHARS} characters, got {len(s)}.", "stop"
            )
        _text(s, "stop")
    return tuple(s for s in listed if s)


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(f"messages[{index}].content: only text parts are supported.", "messages")
            parts.append(part["text"])
        text = "\n".join(parts)
    else:
        raise bad_request(f"messages[{index}].content must be a string or a list of text parts.", "messages")
    return _text(text, "messages", f"messages[{index}].content")


def _check_prompt_size(size: int, param: str, unit: str) -> None:
    if size > MAX_PROMPT_SIZE:
        raise bad_request(
            f"The prompt is too long: {size} {unit}; at most {MAX_PROMPT_SIZE} are accepted.",
            param,
            "context_length_exceeded",
        )


def parse_chat(body: Any) -> ParsedRequest:
    model, options, stream, include_usage, user = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"At most {MAX_MESSAGES} messages are accepted.", "messages")
    parsed = []
    size = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object.", "messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}.", "messages")
        content = _content_text(message.get("content"), i)
        size += len(content)
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    _check_prompt_size(size, "messages", "characters in all messages")
    return ParsedRequest(model, options, stream, include_usage, user, messages=parsed)


def parse_completion(body: Any) -> ParsedRequest:
    model, options, stream, include_usage, user = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt:
        _check_prompt_size(len(prompt), "prompt", "items")
    if isinstance(prompt, list) and prompt and set(map(type, prompt)) == {int}:  # no bools; at C speed
        return ParsedRequest(model, options, stream, include_usage, user, prompt=prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise bad_request("Send one prompt per request (batched prompts are not supported).", "prompt")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a string.", "prompt")
    _check_prompt_size(len(prompt), "prompt", "characters")
    return ParsedRequest(model, options, stream, include_usage, user, prompt=_text(prompt, "prompt"))


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        raise APIError(400, f"Token ids must be in [0, {vocab_size}).", param="prompt")
