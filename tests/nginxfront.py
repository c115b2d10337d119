"""nginx in front of lorabox boxes, as docs/scaling.md sets it up: the doc's own nginx blocks with
their addresses replaced by loopback ones, run by a real nginx (no TLS, no root, a prefix of its
own), for tests/test_scaling.py: consistent hash by key, and round robin."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.testing.localserver import free_port, http_status

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "scaling.md"


def documented_nginx_block(upstream: str = "hash") -> str:
    """The doc's `upstream` block of one route ("hash": consistent hash by key, "round robin": with
    the limits in Redis) followed by the `server` block both routes share."""
    blocks = [str(b) for b in re.findall(r"```nginx\n(.*?)```", DOC.read_text(), re.S)]
    upstreams = [b for b in blocks if "upstream lorabox" in b]
    servers = [b for b in blocks if "upstream lorabox" not in b]
    assert (len(upstreams), len(servers)) == (2, 1), "docs/scaling.md: two upstream blocks, one server block"
    hashed = [b for b in upstreams if "hash $http_authorization" in b]
    assert len(hashed) == 1, "docs/scaling.md: one upstream hashes by key, the other is round robin"
    chosen = hashed[0] if upstream == "hash" else next(b for b in upstreams if b not in hashed)
    return chosen + "\n" + servers[0]


def render(block: str, upstreams: list[str], port: int) -> str:
    """The doc's block with its boxes' addresses replaced, listening on a loopback port without TLS."""
    boxes = iter(upstreams)
    lines = []
    for line in block.splitlines():
        words = line.split()
        if words[:1] == ["server"] and ":" in words[1]:  # an upstream box, parameters kept
            line = line.replace(words[1], next(boxes))
        elif words[:1] == ["listen"]:
            line = f"    listen 127.0.0.1:{port};"
        elif words[:1] and words[0].startswith("ssl_"):
            continue
        lines.append(line)
    assert next(boxes, None) is None, "the doc's upstream should name exactly the two boxes"
    return "\n".join(lines)


def nginx_conf(prefix: Path, http_block: str) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
master_process off;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
{http_block}
}}
"""


@contextmanager
def running_nginx(prefix: Path, upstreams: list[str], upstream: str = "hash") -> Iterator[str]:
    """nginx on a free loopback port running the doc's configuration for `upstreams` (host:port);
    yields its URL once it answers /healthz."""
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, render(documented_nginx_block(upstream), upstreams, port)))
    process = subprocess.Popen(["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while http_status(f"{url}/healthz") != 200:
            assert process.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)
