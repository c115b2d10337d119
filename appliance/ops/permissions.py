"""May a given user read, write or enter a path? Worked out from the owner, the mode bits and the
POSIX ACL, for a user other than the caller: `lorabox doctor` runs as root or as an operator and
asks on behalf of the service user, where `os.access` would answer for itself (and root may do
anything). No privilege is needed to read an ACL; where it cannot be read, the mode bits decide.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import struct
from dataclasses import dataclass

READ, WRITE, EXECUTE = 4, 2, 1
ACL_XATTR = "system.posix_acl_access"
# linux/posix_acl_xattr.h: a 4-byte version, then (tag u16, perm u16, id u32) per entry.
ACL_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def of_user(cls, name: str) -> Identity:
        """The user's uid and every group it is in; KeyError if there is no such user."""
        entry = pwd.getpwnam(name)
        groups = {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, entry.pw_uid, frozenset({entry.pw_gid, *groups}))


def _acl(path: str) -> list[tuple[int, int, int]] | None:
    try:
        raw = os.getxattr(path, ACL_XATTR, follow_symlinks=True)
    except OSError:
        return None  # none set (the mode bits are the ACL), or no ACL support
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != ACL_VERSION:
        return None
    return [struct.unpack_from("<HHI", raw, offset) for offset in range(4, len(raw) - 7, 8)]


def allowed(path: str | os.PathLike[str], who: Identity, want: int) -> bool:
    """True if `who` has every permission bit of `want` (READ | WRITE | EXECUTE) on `path`."""
    info = os.stat(path)
    if who.uid == 0:  # root: anything, but executing a file needs some x bit
        return not (want & EXECUTE and stat.S_ISREG(info.st_mode) and not info.st_mode & 0o111)
    acl = _acl(os.fspath(path))
    if acl is None:
        if info.st_uid == who.uid:
            granted = info.st_mode >> 6
        elif info.st_gid in who.gids:
            granted = info.st_mode >> 3
        else:
            granted = info.st_mode
        return granted & want == want
    # POSIX.1e access check: owner, named user (masked), owning and named groups (masked), other.
    mask = next((perm for tag, perm, _ in acl if tag == MASK), 0o7)
    if info.st_uid == who.uid:
        return next(perm for tag, perm, _ in acl if tag == USER_OBJ) & want == want
    named = [perm for tag, perm, uid in acl if tag == USER and uid == who.uid]
    if named:
        return named[0] & mask & want == want
    groups = [
        perm
        for tag, perm, gid in acl
        if (tag == GROUP_OBJ and info.st_gid in who.gids) or (tag == GROUP and gid in who.gids)
    ]
    if groups:
        return any(perm & mask & want == want for perm in groups)
    return next(perm for tag, perm, _ in acl if tag == OTHER) & want == want


def reachable(
    path: str | os.PathLike[str], who: Identity, stop_at: str | os.PathLike[str] | None = None
) -> bool:
    """True if `who` may enter every folder on the way to `path` (not `path` itself), from `/` or
    from `stop_at` (an install root, whose own parents are this machine's business)."""
    top = os.path.abspath(stop_at) if stop_at is not None else None
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        if not allowed(parent, who, EXECUTE):
            return False
        if parent in (top, os.path.dirname(parent)):
            return True
        parent = os.path.dirname(parent)
