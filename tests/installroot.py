"""install.sh's server install into a throwaway root (`--root`), as the tests run it: no pip (the
venv is made, nothing is downloaded or built) and an existing unprivileged user as the service
user (`daemon` on Debian and Ubuntu), so that ownership, modes and ACLs are real."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE_USER = "daemon"


@dataclass
class Installed:
    root: Path

    def __truediv__(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def config(self) -> Path:
        return self / "/etc/lorabox/lorabox.toml"

    @property
    def unit(self) -> Path:
        return self / "/etc/systemd/system/lorabox.service"

    @property
    def state(self) -> Path:
        return self / "/var/lib/lorabox"

    @property
    def adapters(self) -> Path:
        return self / "/var/lib/lorabox/adapters"

    def install(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        """install.sh --root ROOT ARGS; its whole output (stderr: the >>> lines)."""
        result = subprocess.run(
            ["bash", str(REPO / "install.sh"), "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            env={**os.environ, "LORABOX_SKIP_PIP": "1", "LORABOX_USER": SERVICE_USER, **(env or {})},
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr


@contextmanager
def install_root() -> Iterator[Installed]:
    """A fresh root that the service user can walk into (pytest's own tmp folders are root's, 0700)."""
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise AssertionError(
            f"these tests need the system user {SERVICE_USER!r} (Debian and Ubuntu have it)"
        ) from None
    root = Path(tempfile.mkdtemp(prefix="lorabox-root-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield Installed(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
