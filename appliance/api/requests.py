"""Parse and check OpenAI request bodies. Every rejection names the offending parameter.

Unknown fields are ignored, as OpenAI-compatible servers commonly do, so newer clients keep
working. Known fields this server cannot honour are refused rather than silently dropped, and
`cache_salt` is refused outright: the server sets it per tenant, a client never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..serving.generator import SamplingOptions
from .errors import APIError, bad_request

MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 4096
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
    _optional_int(body, "n", 1, 1)  # only one choice per request
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(
                f"'{penalty}' is not supported by this server.", penalty, "unsupported_parameter"
            )

    max_tokens = _optional_int(body, "max_completion_tokens", 1, 1 << 30)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, 1 << 30)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_SEQUENCES:
        stops = tuple(s for s in stop if s)
    else:
        raise bad_request(f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} strings.", "stop")
    options = SamplingOptions(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=_optional_int(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop=stops,
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
    return model, options, bool(stream), include_usage, user


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(f"messages[{index}].content: only text parts are supported.", "messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts.", "messages")


def parse_chat(body: Any) -> ParsedRequest:
    model, options, stream, include_usage, user = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"At most {MAX_MESSAGES} messages are accepted.", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object.", "messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}.", "messages")
        parsed.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content_text(message.get("content"), i),
            }
        )
    return ParsedRequest(model, options, stream, include_usage, user, messages=parsed)


def parse_completion(body: Any) -> ParsedRequest:
    model, options, stream, include_usage, user = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return ParsedRequest(model, options, stream, include_usage, user, prompt=list(prompt))
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise bad_request("Send one prompt per request (batched prompts are not supported).", "prompt")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a string.", "prompt")
    return ParsedRequest(model, options, stream, include_usage, user, prompt=prompt)


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise APIError(400, f"Token ids must be in [0, {vocab_size}).", param="prompt")
