"""Tenant and adapter-version names: the strict patterns of the drop-folder contract."""

from __future__ import annotations

import re

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DIGITS = re.compile(r"(\d+)")


def is_tenant_name(name: str) -> bool:
    return TENANT_RE.fullmatch(name) is not None


def is_version_name(name: str) -> bool:
    return VERSION_RE.fullmatch(name) is not None and not is_ignored_name(name)


def is_ignored_name(name: str) -> bool:
    """Copies in progress: dot names and `.tmp` / `.partial` suffixes are never loaded."""
    return name.startswith(".") or name.endswith((".tmp", ".partial"))


def natural_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key so that v2 < v10 and 1.9 < 1.10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(version) if part)
