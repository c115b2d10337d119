"""A tenant's guardrails: patterns its requests must not match, and what its model's text may not say.

Rule: `deny_input` patterns are searched in a request's messages (or prompt); a match refuses it.
`deny_output` patterns are searched in each choice's text as it is generated; the text is cut
where the first match begins, and the choice ends with finish_reason "content_filter".
`redact_output` detectors (e-mail addresses, phone numbers, Luhn-checked payment card numbers)
have each match replaced by `[redacted]`.

Bound: patterns are RE2 (google-re2: a linear-time engine, no backtracking), so no pattern and no
text makes a search super-linear; a list is capped at MAX_PATTERNS of MAX_PATTERN_CHARS each.
Streamed text is held back as stop strings are (serving/tokenization.StopMatcher): a character is
released only once no match can begin at it, so a stream never shows the start of a match, and
what is released does not depend on how the text was split into pushes. A deny_output match may
span at most MAX_SPAN characters (checked when the pattern is set), and that span is the most text
held back; a detector holds back only the trailing run of characters its matches can consist of
(a word being written, a number being written). Each push searches the held text once per stage:
O(span) work per token.

Knob: none beyond the patterns; a tenant with no guardrails pays nothing.
"""

from __future__ import annotations

import functools
import re
import re._parser as sre_parse  # only to work out how long a pattern's matches can be
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import re2

from ..errors import PolicyError

MAX_PATTERNS = 200
MAX_PATTERN_CHARS = 500
MAX_SPAN = 256
"""Characters a deny_output match may span at most: the text a stream holds back at most."""
REDACTED = "[redacted]"

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is the caller's error, not a line on stderr


def _re2(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def _span(pattern: str) -> tuple[int, int]:
    """(fewest, most) characters a match can span, by Python's parser: RE2's own escapes for one
    character (`\\pL`, `\\p{Greek}`, `\\C`) stand in as `.`, `\\z` as `\\Z`."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "pP":
                end = pattern.find("}", i) + 1 if pattern[i + 2 : i + 3] == "{" else i + 3
                out.append(".")
                i = max(end, i + 3)
                continue
            out.append("." if nxt == "C" else "\\Z" if nxt == "z" else pattern[i : i + 2])
            i += 2
            continue
        out.append(char)
        i += 1
    low, high = sre_parse.parse("".join(out)).getwidth()
    return int(low), int(high)


def check_patterns(name: str, raw: Any) -> tuple[str, ...]:
    """The patterns of `deny_input` / `deny_output` as set (a list, one pattern, or "none"),
    refused with the field and the pattern's place when one is not fit to run."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
        return ()
    patterns = [raw] if isinstance(raw, str) else raw
    if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
        raise PolicyError(name, "must be a list of patterns (text)")
    if len(patterns) > MAX_PATTERNS:
        raise PolicyError(name, f"at most {MAX_PATTERNS} patterns, not {len(patterns)}")
    for index, pattern in enumerate(patterns):
        where = f"pattern {index + 1}"
        if not pattern:
            raise PolicyError(name, f"{where} is empty")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PolicyError(name, f"{where}: at most {MAX_PATTERN_CHARS} characters, not {len(pattern)}")
        try:
            regex = _re2(pattern)
        except re2.error as exc:
            raise PolicyError(name, f"{where} is not a valid RE2 pattern: {_reason(exc)}") from None
        if regex.search("") is not None:
            raise PolicyError(name, f"{where} matches empty text, so it would match everything")
        if name == "deny_output":
            try:
                high = _span(pattern)[1]
            except (re.error, RecursionError, OverflowError) as exc:
                raise PolicyError(name, f"{where}: cannot tell how long its matches are ({exc})") from None
            if high > MAX_SPAN:
                raise PolicyError(
                    name,
                    f"{where} may match more than {MAX_SPAN} characters: bound its repeats "
                    "(`{0,40}` instead of `*` or `+`), since a stream holds back that much text",
                )
    try:
        _compile(tuple(patterns))
    except re2.error as exc:
        raise PolicyError(name, f"the patterns together are too large to compile: {_reason(exc)}") from None
    return tuple(patterns)


def _reason(exc: Exception) -> str:
    text = str(exc.args[0] if exc.args else exc)
    return text[2:-1] if text.startswith(("b'", 'b"')) else text


@functools.lru_cache(maxsize=512)
def _compile(patterns: tuple[str, ...]) -> Any:
    return _re2("|".join(f"(?:{p})" for p in patterns))


@functools.lru_cache(maxsize=512)
def _checked(name: str, patterns: tuple[str, ...]) -> tuple[str, ...]:
    return check_patterns(name, patterns)


def input_denied(patterns: tuple[str, ...], texts: Iterable[str]) -> bool:
    """Whether any of the texts matches any of the patterns (checked against the caps again, once
    per list: a database edited by hand does not get past them; PolicyError)."""
    if not patterns:
        return False
    regex = _compile(_checked("deny_input", tuple(patterns)))
    return any(regex.search(text) is not None for text in texts)


# -- the output path ----------------------------------------------------------------------------


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = "".join(c for c in match if c.isdigit())
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _phone(match: str) -> bool:
    # E.164 numbers have at most 15 digits; fewer than 8 is a year, an amount, a version.
    return 8 <= sum(c.isdigit() for c in match) <= 15


@dataclass(frozen=True)
class _Detector:
    pattern: str
    chars: str
    """Every character a match can consist of: a run of other characters decides it."""
    span: int
    accept: Callable[[str], bool] = lambda _: True


_NUMBER_CHARS = "0123456789 .-()+"
DETECTORS = {
    "email": _Detector(
        r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}\b",
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-@",
        64 + 1 + 63 + 4 * 64,
    ),
    "card": _Detector(r"\b\d(?:[ -]?\d){12,18}\b", _NUMBER_CHARS, 37, _card),
    "phone": _Detector(
        r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\b\d{1,4}[ .-])(?:\d{2,4}[ .-]){0,3}\d{3,4}\b"
        r"|\+\d{7,14}\b",
        _NUMBER_CHARS,
        60,
        _phone,
    ),
}


def check_detectors(name: str, raw: Any) -> tuple[str, ...]:
    """`redact_output` as set: detector names, as a list or "email,phone"; "none": none."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
        return ()
    names = [n.strip() for n in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise PolicyError(name, "must be a list of detectors")
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise PolicyError(name, f"no detector {unknown[0][:40]!r} (known: {', '.join(DETECTORS)})")
    return tuple(n for n in DETECTORS if n in names)  # one order, whatever order they were named in


class _Held:
    """One stage of the output path: finds matches in streamed text, cuts or replaces them.

    `undecided` is the first held character at which a match could still begin or change with
    more text: within `span` of the end, and (for a detector) inside the trailing run of the
    characters its matches consist of. Matches are taken only before it; text is released only up
    to it, so every decision is the one the whole text would give."""

    def __init__(self, regex: Any, span: int, chars: str | None, accepts: tuple[Callable[[str], bool], ...]):
        self.regex, self.span, self.accepts = regex, span, accepts
        self.chars = frozenset(chars) if chars is not None else None
        self.held = ""
        self.before = ""  # the last character released: context for \b

    def _undecided(self, held: str) -> int:
        start = max(0, len(held) - self.span)
        if self.chars is None:
            return start
        run = len(held)
        while run > start and held[run - 1] in self.chars:
            run -= 1
        return run

    def push(self, text: str, final: bool) -> tuple[str, bool, bool]:
        """(text safe to release, cut here, something replaced)."""
        held = self.held + text
        subject, offset = self.before + held, len(self.before)
        undecided = len(held) if final else self._undecided(held)
        out: list[str] = []
        released = scan = 0
        replaced = False
        while scan < undecided:
            match = self.regex.search(subject, offset + scan)
            if match is None or match.start() - offset >= undecided:
                break
            start, end = match.start() - offset, match.end() - offset
            if not self.accepts:  # a deny pattern: the text ends where it begins
                self.held, self.before = "", ""
                return "".join([*out, held[released:start]]), True, replaced
            group = next(i for i in range(len(self.accepts)) if match.group(i + 1) is not None)
            # Decided either way, the match's own text included: taken whole, or left whole (a
            # number failing its check is not searched again for a shorter match inside it).
            if self.accepts[group](match.group()):
                out += [held[released:start], REDACTED]
                replaced = True
            else:
                out.append(held[released:end])
            released = scan = max(end, start + 1)
        stop = max(released, undecided)
        out.append(held[released:stop])
        if stop:
            self.before = held[stop - 1]
        self.held = held[stop:]
        return "".join(out), False, replaced


@dataclass(frozen=True)
class OutputRules:
    """What a tenant's output path applies (each choice gets an OutputGuard of its own)."""

    deny: tuple[str, ...] = ()
    redact: tuple[str, ...] = ()


def output_rules(deny: Iterable[str], redact: Iterable[str]) -> OutputRules | None:
    """None when there is nothing to apply. The caps are checked again here: a database edited
    by hand does not get past them (PolicyError)."""
    deny, redact = _checked("deny_output", tuple(deny)), check_detectors("redact_output", list(redact))
    return OutputRules(deny, redact) if deny or redact else None


@functools.lru_cache(maxsize=512)
def _deny_span(patterns: tuple[str, ...]) -> int:
    return max(_span(p)[1] for p in patterns)


@functools.lru_cache(maxsize=64)
def _detector_stage(names: tuple[str, ...]) -> tuple[Any, int, str, tuple[Callable[[str], bool], ...]]:
    detectors = [DETECTORS[n] for n in names]
    regex = _re2("|".join(f"({d.pattern})" for d in detectors))
    return (
        regex,
        max(d.span for d in detectors),
        "".join(d.chars for d in detectors),
        tuple(d.accept for d in detectors),
    )


@dataclass
class OutputGuard:
    """One choice's guardrails: deny_output on the model's own text, then the detectors (e-mail
    addresses alone; numbers, whose runs include spaces, together)."""

    rules: OutputRules
    actions: set[str] = field(default_factory=set)
    """Which guardrails acted: deny_output, redact_output."""
    _stages: list[_Held] = field(init=False)
    _deny: _Held | None = field(init=False)

    def __post_init__(self) -> None:
        rules = self.rules
        self._deny = None
        if rules.deny:
            self._deny = _Held(_compile(rules.deny), _deny_span(rules.deny), None, ())
        groups = [
            tuple(n for n in rules.redact if n == "email"),
            tuple(n for n in rules.redact if n != "email"),
        ]
        self._stages = [_Held(*_detector_stage(g)) for g in groups if g]

    def push(self, text: str, final: bool) -> tuple[str, bool]:
        """(text to release, cut by deny_output: the choice ends here)."""
        cut = False
        if self._deny is not None:
            text, cut, _ = self._deny.push(text, final)
            if cut:
                self.actions.add("deny_output")
        for stage in self._stages:
            text, _, replaced = stage.push(text, final or cut)
            if replaced:
                self.actions.add("redact_output")
        return text, cut
