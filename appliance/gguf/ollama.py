"""An Ollama Modelfile for an exported GGUF, with the model's chat template in Ollama's Go syntax.

Ollama templates are Go templates over `.Messages` (each with `.Role` and `.Content`), not Jinja.
Rather than parse Jinja, the translation observes it: the Hugging Face template is rendered for
conversations of marker messages, and the text around the markers gives a fixed head, one pattern
per message, and the generation prompt. It is checked on every role before it is trusted, so a
template whose messages are not all rendered alike (a special first turn, a default system prompt)
is reported as untranslatable instead of being translated wrongly.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any


class Untranslatable(ValueError):
    pass


def _marker(kind: str, index: int) -> str:
    # Invisible separators never appear in a real template; the spaces around them reveal a
    # template that trims or otherwise rewrites content, which a Go template would not do.
    return f" \u2063lorabox-{kind}-{index}\u2063\n"


def _go_literal(text: str) -> str:
    """Literal text in a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def go_chat_template(tokenizer: Any) -> tuple[str, str]:
    """(Go template, the text that ends a turn) for the tokenizer's chat template; or Untranslatable."""

    def render(messages: list[dict[str, str]], generation: bool = False) -> str:
        try:
            return str(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            )
        except Exception as exc:  # Jinja raises whatever the template's author chose
            raise Untranslatable(f"the template cannot render a plain conversation: {exc}") from exc

    def message(role: str, index: int) -> dict[str, str]:
        return {"role": role, "content": _marker("content", index)}

    if not getattr(tokenizer, "chat_template", None):
        raise Untranslatable("the model has no chat template")
    conversation = [message(role, i) for i, role in enumerate(("system", "user", "assistant", "user"))]
    renders = [render(conversation[:n]) for n in range(1, len(conversation) + 1)]
    pieces = []  # the text each of the user, assistant, user messages adds
    for shorter, longer in itertools.pairwise(renders):
        if not longer.startswith(shorter):
            raise Untranslatable("a longer conversation does not extend a shorter one's text")
        pieces.append(longer[len(shorter) :])
    # Every message must be the same pattern, with its own role and content put in.
    content = _marker("content", 3)
    if pieces[2].count("user") != 1 or pieces[2].count(content) != 1:
        raise Untranslatable("a message's role or content is not written exactly once")
    pattern = pieces[2].replace(content, "\0content\0").replace("user", "\0role\0")

    def filled(role: str, index: int) -> str:
        return pattern.replace("\0role\0", role).replace("\0content\0", _marker("content", index))

    if pieces[0] != filled("user", 1) or pieces[1] != filled("assistant", 2):
        raise Untranslatable("the template writes user or assistant messages differently from others")
    if not renders[0].endswith(filled("system", 0)):
        raise Untranslatable("the template writes a system message differently from the others")
    head = renders[0][: len(renders[0]) - len(filled("system", 0))]
    alone = render(conversation[1:2])
    if alone != head + filled("user", 1):
        raise Untranslatable("a conversation without a system message gets something added (a default?)")
    prompt = render(conversation[1:2], generation=True)
    if not prompt.startswith(alone):
        raise Untranslatable("the generation prompt does not follow the conversation")
    before, _, after = pattern.partition("\0content\0")
    turn = _go_literal(before).replace("\0role\0", "{{ .Role }}") + "{{ .Content }}" + _go_literal(after)
    generation = _go_literal(prompt[len(alone) :])
    return f"{_go_literal(head)}{{{{ range .Messages }}}}{turn}{{{{ end }}}}{generation}", after.strip()


def write_modelfile(gguf_path: Path, tokenizer: Any, title: str) -> Path:
    """`<name>.Modelfile` beside the GGUF: `ollama create <name> -f <name>.Modelfile` runs it."""
    lines = [
        f"# {title}",
        f"# ollama create {gguf_path.stem} -f {gguf_path.stem}.Modelfile",
        f"FROM ./{gguf_path.name}",
    ]
    stops = [str(tokenizer.eos_token)] if tokenizer.eos_token else []
    try:
        template, end_of_turn = go_chat_template(tokenizer)
    except Untranslatable as exc:
        lines.append(f"# No TEMPLATE: the chat template could not be translated for Ollama ({exc}).")
    else:
        if '"""' in template:
            lines.append('# No TEMPLATE: the chat template contains """, which a Modelfile cannot quote.')
        else:
            lines.append(f'TEMPLATE """{template}"""')
            stops.insert(0, end_of_turn)
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
