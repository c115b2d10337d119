"""The audit log: every operator action, who took it, and what it changed (before → after).

Actors: the Unix user behind the admin socket (SO_PEERCRED, read by the admin API) or the user
running the CLI when it writes the database itself. Prompt and completion text never get here;
a system prompt is shown by its size and digest only (policy.describe).
"""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from typing import Any


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def local_user() -> str:
    """Whoever runs this process; the user behind sudo as well, when there is one."""
    name = user_name(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (sudo by {sudo})" if os.getuid() == 0 and sudo else name


@dataclass(frozen=True)
class Change:
    """What an action changed: only the fields that differ, each as it was and as it is."""

    before: dict[str, Any]
    after: dict[str, Any]

    @classmethod
    def of(cls, before: dict[str, Any], after: dict[str, Any]) -> Change:
        changed = [k for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)]
        return cls(
            {k: before[k] for k in changed if k in before}, {k: after[k] for k in changed if k in after}
        )

    def columns(self) -> dict[str, str]:
        return {"before": json.dumps(self.before), "after": json.dumps(self.after)}


def change_text(before: str | None, after: str | None) -> str:
    """`rpm 60 → 120, tpm (default) → 40000` from an audit row's JSON columns ("-": not there)."""
    old, new = json.loads(before or "{}"), json.loads(after or "{}")

    def shown(side: dict[str, Any], key: str) -> str:
        return "-" if key not in side else "none" if side[key] is None else str(side[key])

    return ", ".join(f"{k} {shown(old, k)} → {shown(new, k)}" for k in dict.fromkeys([*old, *new]))
