"""Parse and check OpenAI request bodies. Every rejection names the offending parameter.

Unknown fields are ignored, as OpenAI-compatible servers commonly do, so newer clients keep
working. Known fields this server cannot honour are refused rather than silently dropped, and
`cache_salt` is refused outright: the server sets it per tenant, a client never does. What needs
the model or the tenant to be judged (token ids against the vocabulary, `n` against the tenant's
cap, a schema llguidance cannot enforce) is refused by the checks at the end, still named here.

What one request may ask for is bounded (README, "Using it"): the server's work for a request
(holding back and matching stop strings, rendering and tokenizing the prompt) is proportional to
these limits, never to more. Every string used must be valid Unicode: JSON can carry lone
surrogates (`"\\ud800"`), which the tokenizer, SQLite and the response encoder all refuse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from ..serving.generator import SamplingOptions
from ..serving.structured import ANY_OBJECT, GrammarRefused, check_schema
from ..serving.tools import Tool, ToolCalling
from .errors import APIError, bad_request

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # per stop string; what could be its start is held back from the stream
MAX_MESSAGES = 4096
MAX_PROMPT_SIZE = 1 << 20  # characters of all messages' text together, or of the prompt (or its token ids)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 128  # choices per request, whatever a tenant's cap (policy `max_n`) says
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit; vLLM's default)
MAX_LOGIT_BIAS = 1024  # biased tokens per request
MAX_TOOLS = 128  # as OpenAI
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as OpenAI
# Fields we recognise but do not implement: refusing beats silently ignoring them.
UNSUPPORTED = ("functions", "function_call", "best_of", "echo", "suffix", "audio", "modalities",
               "prediction")  # fmt: skip
CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls", "top_logprobs")
SERVER_OWNED = ("cache_salt", "lora_request", "lora")


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    options: SamplingOptions
    stream: bool
    include_usage: bool
    user: str | None
    messages: list[dict[str, Any]] | None = None  # chat, as the chat template takes them
    prompt: str | list[int] | None = None  # completions
    content_schema: dict[str, Any] | None = None
    """`response_format`: the JSON schema the content must match (json_object: any object)."""
    tools: ToolCalling | None = None  # chat
    prompt_chars: int = 0
    """Characters of text in messages and tools together (what rendering them costs)."""
    service_tier: str | None = None
    """`default` or `flex` (the scheduler's background band, at the batch prices), if asked for."""


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

    max_tokens = _optional_int(body, "max_completion_tokens", 1, 1 << 30)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, 1 << 30)
    min_tokens = _optional_int(body, "min_tokens", 0, 1 << 30) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(
            f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens}).", "min_tokens"
        )
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0)
    if repetition_penalty == 0.0:
        raise bad_request("'repetition_penalty' must be greater than 0.", "repetition_penalty")
    options = SamplingOptions(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=_optional_int(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop=_stops(body.get("stop")),
        n=_optional_int(body, "n", 1, MAX_N) or 1,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=repetition_penalty,
        logit_bias=_logit_bias(body.get("logit_bias")),
        min_tokens=min_tokens,
        ignore_eos=_flag(body, "ignore_eos", False),
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


def _flag(body: dict, name: str, default: bool) -> bool:  # type: ignore[type-arg]
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean.", name)
    return value


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """{"token id": bias, ...}: ids as decimal strings (as JSON keys must be), biases -100..100."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to biases.", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' may bias at most {MAX_LOGIT_BIAS} tokens.", "logit_bias")
    biases = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise bad_request(f"'logit_bias' keys must be token ids, got {key[:20]!r}.", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise bad_request(
                f"'logit_bias' values must be numbers between -100 and 100, got {str(bias)[:20]}.",
                "logit_bias",
            )
        biases.append((int(key), float(bias)))
    return tuple(biases)


def _chat_logprobs(body: dict) -> int | None:  # type: ignore[type-arg]
    """Chat: `logprobs` true, with `top_logprobs` alternatives (0-20)."""
    top = _optional_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if not _flag(body, "logprobs", False):
        if top is not None:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        return None
    return top or 0


def _response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the content to match; None for plain text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("'response_format' must be an object.", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise bad_request(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'.", "response_format"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object.", "response_format")
    name = spec.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise bad_request(
            "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'.", "response_format"
        )
    if not isinstance(spec.get("strict", False), bool | None):
        raise bad_request("'response_format.json_schema.strict' must be a boolean.", "response_format")
    schema = spec.get("schema")
    if schema is None:
        return ANY_OBJECT
    return _schema(schema, "response_format.json_schema.schema", "response_format")


def _schema(schema: Any, where: str, param: str) -> dict[str, Any]:
    try:
        return check_schema(schema, f"'{where}'")
    except GrammarRefused as exc:
        raise bad_request(str(exc), param) from exc


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


def _service_tier(value: Any) -> str | None:
    """OpenAI's tiers as lorabox has them: `auto` and `default` are the default tier, `flex` runs in
    the capacity interactive requests leave (and costs what a batch line costs)."""
    if value is None:
        return None
    if value in ("auto", "default"):
        return "default"
    if value == "flex":
        return "flex"
    raise bad_request(
        f"'service_tier' must be one of 'auto', 'default' or 'flex' here, got {str(value)[:20]!r}.",
        "service_tier",
    )


def parse_chat(body: Any) -> ParsedRequest:
    model, options, stream, include_usage, user = _common(body)
    tier = _service_tier(body.get("service_tier"))
    options = replace(options, logprobs=_chat_logprobs(body))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"At most {MAX_MESSAGES} messages are accepted.", "messages")
    parsed, size = [], 0
    for i, message in enumerate(messages):
        rendered, chars = _message(message, i)
        parsed.append(rendered)
        size += chars
    tools, chars = _tools(body)
    size += chars
    _check_prompt_size(size, "messages", "characters in all messages")
    return ParsedRequest(
        model,
        options,
        stream,
        include_usage,
        user,
        messages=parsed,
        content_schema=_response_format(body.get("response_format")),
        tools=tools,
        prompt_chars=size,
        service_tier=tier,
    )


def _message(message: Any, i: int) -> tuple[dict[str, Any], int]:
    """One message as the chat template takes it, and the characters of text in it."""
    if not isinstance(message, dict):
        raise bad_request(f"messages[{i}] must be an object.", "messages")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}.", "messages")
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None and message.get("content") is None:
        content = ""  # an assistant message that only called tools
    else:
        content = _content_text(message.get("content"), i)
    rendered: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    size = len(content)
    if calls is not None:
        rendered["tool_calls"], chars = _sent_calls(calls, i)
        size += chars
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 256:
            raise bad_request(f"messages[{i}].tool_call_id is required (a string).", "messages")
        rendered["tool_call_id"] = _text(call_id, "messages", f"messages[{i}].tool_call_id")
        size += len(call_id)
    return rendered, size


def _sent_calls(calls: Any, i: int) -> tuple[list[dict[str, Any]], int]:
    """An assistant message's `tool_calls`, their arguments as objects (what chat templates expect)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise bad_request(f"{where} must be a list of at most {MAX_TOOLS} calls.", "messages")
    rendered, size = [], 0
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        typed = isinstance(call, dict) and call.get("type", "function") == "function"
        if not typed or not isinstance(name, str) or not isinstance(arguments, str):
            raise bad_request(
                f"{where}[{j}] must be {{'type': 'function', 'id': ..., 'function': {{'name': ..., "
                "'arguments': '<JSON>'}}.",
                "messages",
            )
        _text(arguments, "messages", f"{where}[{j}].function.arguments")
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise bad_request(f"{where}[{j}].function.arguments must be a JSON object, as text.", "messages")
        call_id = call.get("id")
        rendered.append(
            {
                "id": _text(call_id, "messages") if isinstance(call_id, str) else f"call_{i}_{j}",
                "type": "function",
                "function": {"name": _text(name, "messages"), "arguments": parsed},
            }
        )
        size += len(name) + len(arguments)
    return rendered, size


def _tools(body: dict) -> tuple[ToolCalling | None, int]:  # type: ignore[type-arg]
    """`tools`, `tool_choice` and `parallel_tool_calls`; and the characters the tools add."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = _flag(body, "parallel_tool_calls", True)
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'.", "tool_choice")
        return None, 0
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' must be a list of at most {MAX_TOOLS} functions.", "tools")
    parsed, size = [], 0
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'.", "tools")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise bad_request(f"tools[{i}].function.description must be a string.", "tools")
        _text(description, "tools", f"tools[{i}].function.description")
        parameters = function.get("parameters")
        if parameters is not None:
            parameters = _schema(parameters, f"tools[{i}].function.parameters", "tools")
        parsed.append(Tool(name, parameters or {}, {"type": "function", "function": function}))
        size += len(json.dumps(function, ensure_ascii=False))
    if len({t.name for t in parsed}) < len(parsed):
        raise bad_request("'tools' names a function twice.", "tools")
    return ToolCalling(tuple(parsed), _tool_choice(choice, {t.name for t in parsed}), parallel), size


def _tool_choice(choice: Any, names: set[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return str(choice)
    named = isinstance(choice, dict) and choice.get("type") == "function"
    function = choice.get("function") if named else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
            "{'name': ...}}.",
            "tool_choice",
        )
    if name not in names:
        raise bad_request(f"'tool_choice' names {name[:64]!r}, which is not in 'tools'.", "tool_choice")
    return name


def parse_completion(body: Any) -> ParsedRequest:
    model, options, stream, include_usage, user = _common(body)
    tier = _service_tier(body.get("service_tier"))
    for name in CHAT_ONLY:
        if body.get(name) not in (None, False, [], {}):
            raise bad_request(f"'{name}' is for chat completions only.", name, "unsupported_parameter")
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):
        raise bad_request(f"'logprobs' must be an integer (0-{MAX_LOGPROBS}) here.", "logprobs")
    options = replace(options, logprobs=_optional_int(body, "logprobs", 0, MAX_LOGPROBS))
    schema = _response_format(body.get("response_format"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt:
        _check_prompt_size(len(prompt), "prompt", "items")
    if isinstance(prompt, list) and prompt and set(map(type, prompt)) == {int}:  # no bools; at C speed
        return ParsedRequest(
            model,
            options,
            stream,
            include_usage,
            user,
            prompt=prompt,
            content_schema=schema,
            service_tier=tier,
        )
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise bad_request("Send one prompt per request (batched prompts are not supported).", "prompt")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a string.", "prompt")
    _check_prompt_size(len(prompt), "prompt", "characters")
    return ParsedRequest(
        model,
        options,
        stream,
        include_usage,
        user,
        prompt=_text(prompt, "prompt"),
        content_schema=schema,
        service_tier=tier,
    )


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        raise APIError(400, f"Token ids must be in [0, {vocab_size}).", param="prompt")


def check_against_model(options: SamplingOptions, vocab_size: int, max_n: int, max_tokens: int) -> None:
    """What needs the model and the tenant to judge: biased token ids within the vocabulary, `n`
    within the tenant's cap, `min_tokens` within the max_tokens the request runs with."""
    outside = [token for token, _ in options.logit_bias if token >= vocab_size]
    if outside:
        raise bad_request(
            f"'logit_bias' names token id {outside[0]}, outside the vocabulary [0, {vocab_size}).",
            "logit_bias",
        )
    if options.n > max_n:
        raise bad_request(f"'n' may be at most {max_n} for this key, got {options.n}.", "n")
    if options.min_tokens > max_tokens:
        raise bad_request(
            f"'min_tokens' ({options.min_tokens}) must not exceed max_tokens ({max_tokens}).", "min_tokens"
        )


def grammar_refused(exc: GrammarRefused, parsed: ParsedRequest) -> APIError:
    """A grammar llguidance would not compile, as a refusal naming what it came from."""
    forced = parsed.tools is not None and parsed.tools.choice not in ("none", "auto")
    param = "tools" if forced or parsed.content_schema is None else "response_format"
    return bad_request(f"'{param}' cannot be enforced: {exc}", param)
