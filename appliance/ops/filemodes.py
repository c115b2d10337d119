"""Who may read the box's state: the modes lorabox keeps, restored at start and checked by doctor.

The database holds every key's hash, the usage ledger, the audit log and the tenants' system
prompts; exports are whole tenant models. They belong to the service (owner) and its group, the
operators (read only), and to no one else: the state folder 0750, the database files 0640, the
spool and exports folders 0750 and their files 0640, a demo's keys.json 0600. The daemon creates
files with umask 027 (daemon.py), and at start tightens whatever an older version left looser
(an upgrade fixes existing modes); `install.sh` sets the owner and group.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config.settings import Settings

log = logging.getLogger(__name__)

UMASK = 0o027
FOLDER_MODE, FILE_MODE, KEYS_MODE = 0o750, 0o640, 0o600


@dataclass(frozen=True)
class Kept:
    path: Path
    mode: int
    """The loosest mode it may have."""
    what: str


def kept(settings: Settings, local: Callable[[Path], Path] = Path) -> Iterator[Kept]:
    """Every path of the box whose mode lorabox keeps; `local` maps the box's paths to this
    machine's (doctor --root)."""
    yield Kept(local(settings.state_dir), FOLDER_MODE, "the state folder")
    database = settings.database_path
    for suffix in ("", "-wal", "-shm"):
        yield Kept(local(Path(f"{database}{suffix}")), FILE_MODE, "the database (key hashes, usage, audit)")
    for folder, what in ((settings.usage_spool_path, "usage spool"), (settings.exports_path, "exports")):
        yield Kept(local(folder), FOLDER_MODE, f"the {what} folder")
        for path in _files(local(folder)):
            yield Kept(path, FILE_MODE, f"a file of the {what} folder")
    if settings.source is not None:
        yield Kept(settings.source.parent / "keys.json", KEYS_MODE, "the demo's API keys")


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    except OSError:
        return []


def looser(path: Path, mode: int) -> int | None:
    """The path's mode if it grants more than `mode` (None if not, or if there is no such path)."""
    try:
        actual = stat.S_IMODE(path.lstat().st_mode)
    except OSError:
        return None
    return actual if actual & ~mode & 0o777 else None


def tighten(settings: Settings) -> None:
    """Take away what each kept path grants beyond its mode (never adds a permission); logs what
    it changed, and what it could not (a file someone else owns: install.sh fixes those)."""
    for item in kept(settings):
        actual = looser(item.path, item.mode)
        if actual is None or item.path.is_symlink():
            continue
        tightened = actual & item.mode
        try:
            os.chmod(item.path, tightened)
        except OSError as exc:
            log.warning(
                "%s %s is mode %04o, readable by other users, and cannot be changed (%s): sudo chmod %04o %s",
                item.what,
                item.path,
                actual,
                exc.strerror,
                tightened,
                item.path,
            )
        else:
            log.warning("%s %s was mode %04o: now %04o", item.what, item.path, actual, tightened)
