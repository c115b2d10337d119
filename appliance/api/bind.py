"""The API's port, taken first: a port in use is one line naming it and its holder, before any
engine work (importing vLLM alone takes 15-30 s) or model download, and systemd does not retry it.

The socket bound here is the one the daemon serves on (aiohttp's SockSite), so nothing can take
the port between the check and the serving. It listens only once the daemon starts its site.
"""

from __future__ import annotations

import contextlib
import errno
import pwd
import socket
from pathlib import Path

import psutil

from ..errors import ConfigError

TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


class PortInUse(ConfigError):
    """The configured port is taken; the message names the holder where this user can see it."""


def bind_api(host: str, port: int, where: str) -> socket.socket:
    """A socket bound to host:port (not listening yet); PortInUse or ConfigError if it cannot be.
    `where` names the file the address came from, for the fix."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"host: cannot listen on {host!r} ({exc.strerror}): set host in {where}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        # As aiohttp's own sites: a restart may bind while the last run's connections linger in
        # TIME_WAIT. A listening socket still refuses a second bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is in use by {holder(port)}: stop that, or set port = <a free "
                f"port> in {where}"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"host: {host} is no address of this machine: set host in {where}") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(
                f"port: {port} is a privileged port, which lorabox may not listen on: set port in {where} "
                "(keep 8400 and put nginx on the public port: docs/scaling.md)"
            ) from None
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): set host or port in {where}"
        ) from None
    return sock


def holder(port: int) -> str:
    """Who listens on `port`, as far as this process may see. Another user's processes are hidden
    from an unprivileged service (from all but root under ProtectProc=invisible), but the kernel's
    socket table still names the user."""
    with contextlib.suppress(psutil.Error, OSError):
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status != psutil.CONN_LISTEN or connection.laddr.port != port or not connection.pid:
                continue
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(connection.pid)
                command = " ".join(process.cmdline())[:120] or process.name()
                return f"pid {process.pid} ({process.username()}: {command})"
    found = "another program"
    if (uid := listener_uid(port)) is not None:
        with contextlib.suppress(KeyError):
            found = f"a program of user {pwd.getpwuid(uid).pw_name}"
    return f"{found} (sudo ss -ltnp 'sport = :{port}' names it)"


def listener_uid(port: int) -> int | None:
    """The user owning the socket that listens on `port`, from /proc/net/tcp{,6}."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()  # sl local_address rem_address st ... uid
                if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return int(fields[7])
    return None
