"""Keys against the running daemon: revocation through the CLI takes effect at once."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import post_json

CHAT = "/v1/chat/completions"
BODY = {"model": "initech", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def lorabox(server, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", *args, "--config", str(server.demo.config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_issued_key_works_then_revoked_key_is_401(server):
    issued = lorabox(server, "key", "issue", "initech")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert post_json(server.url + CHAT, BODY, key)[0] == 200
    key_id = key.split("-")[1]
    revoked = lorabox(server, "key", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    status, body = post_json(server.url + CHAT, BODY, key)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    # The tenant's other keys are untouched.
    assert post_json(server.url + CHAT, BODY, server.demo.keys["initech"])[0] == 200


def test_database_holds_no_plaintext_keys(server):
    assert post_json(server.url + CHAT, BODY, server.demo.keys["initech"])[0] == 200
    state = server.demo.database.parent
    blobs = b"".join(p.read_bytes() for p in state.iterdir() if p.name.startswith("lorabox.db"))
    for key in server.demo.keys.values():
        assert key.encode() not in blobs
        secret = key.split("-", 2)[2]  # lbx-<key id>-<secret>; the secret may hold "-" itself
        assert len(secret) >= 32
        assert secret.encode() not in blobs
