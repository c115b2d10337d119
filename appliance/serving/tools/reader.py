"""The model's text → message content and tool calls, as it streams (one reader per choice).

Text that could be the start of a call's marker is held back, like a stop string's start. Once a
marker opens a call, its text is kept until the call is complete, and only then released as a call:
a call that turns out broken (not JSON, an unknown function, cut off by max_tokens) goes out as
the text it was, so streamed and non-streamed answers say the same, and neither is a 500.
A released call's arguments are the JSON object as the model wrote it, in the pieces it came in.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

from .base import Format, JsonScanner


@dataclass(frozen=True)
class CallOut:
    """A complete call, released: the index among the choice's calls, its id, the function's name,
    and its arguments in the pieces the model wrote them (joined: a JSON object)."""

    index: int
    id: str
    name: str
    fragments: tuple[str, ...]

    @property
    def arguments(self) -> str:
        return "".join(self.fragments)


@dataclass
class Released:
    text: str = ""
    calls: list[CallOut] = field(default_factory=list)


class ToolCallReader:
    def __init__(self, format: Format, names: set[str]):
        self.format, self.names = format, names
        self._pending = ""  # text not released yet
        self._offset = 0  # where _pending starts in the whole output
        self._cuts: list[int] = []  # where each piece of text ended, in the whole output
        self._in_call = False  # _pending starts with a marker
        self._after_call = False  # a call was just released: separators are swallowed
        self._anything = False  # something other than spaces was released or opened a call
        self._scanner = JsonScanner()
        self.calls = 0

    def push(self, text: str, final: bool = False) -> Released:
        """The next piece of text; with `final`, the last (everything left is released)."""
        self._pending += text
        self._cuts.append(self._offset + len(self._pending))
        out = Released()
        while self._pending:
            if self._in_call:
                if not self._take(out, final):
                    break
            elif not self._scan(out, final):
                break
        return out

    def _scan(self, out: Released, final: bool) -> bool:
        """Text outside calls: release it up to a marker (True: a call opens there)."""
        pending, fmt = self._pending, self.format
        if self._after_call:
            stripped = pending.lstrip(fmt.separators)
            self._drop(len(pending) - len(stripped))
            pending = stripped
            if not pending:
                return False
            self._after_call = False
        markers_open = not fmt.at_start_only or not self._anything or self.calls
        if fmt.at_start_only and not self._anything and not pending.strip() and not final:
            return False  # only spaces so far: the answer's first word decides
        at = min((i for m in fmt.markers if markers_open and (i := pending.find(m)) >= 0), default=-1)
        if fmt.at_start_only and at > 0 and pending[:at].strip():
            at = -1
        if at >= 0:
            self._release(out, at)
            self._in_call, self._anything = True, True
            self._scanner = JsonScanner()
            return True
        keep = 0 if final or not markers_open else _partial_marker(pending, fmt.markers)
        self._release(out, len(pending) - keep)
        return False

    def _take(self, out: Released, final: bool) -> bool:
        """A call's text: release the calls complete at its start (True: more may follow)."""
        taken = self.format.take(self._pending, final, self.names, self._scanner)
        if taken is None:  # not a call after all: the marker is text, and the scan goes on past it
            marker = next(m for m in self.format.markers if self._pending.startswith(m))
            self._in_call = False
            self._release(out, len(marker))
            return True
        if not taken.used:
            return False
        for call in taken.calls:
            start, end = call.arguments
            out.calls.append(
                CallOut(self.calls, f"call_{uuid.uuid4().hex[:24]}", call.name, self._fragments(start, end))
            )
            self.calls += 1
        self._drop(taken.used)
        self._in_call, self._after_call = False, True
        return True

    def _fragments(self, start: int, end: int) -> tuple[str, ...]:
        """pending[start:end] cut where the pieces of text it came in ended."""
        cuts = [c - self._offset for c in self._cuts if start < c - self._offset < end]
        bounds = [start, *cuts, end]
        return tuple(self._pending[a:b] for a, b in itertools.pairwise(bounds))

    def _release(self, out: Released, count: int) -> None:
        released = self._pending[:count]
        if released.strip():
            self._anything = True
        out.text += released
        self._drop(count)

    def _drop(self, count: int) -> None:
        self._pending = self._pending[count:]
        self._offset += count
        self._cuts = [c for c in self._cuts if c > self._offset]
        if not self._in_call:
            self._scanner = JsonScanner()


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a marker starts with."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest
