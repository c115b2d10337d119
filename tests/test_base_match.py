"""An adapter trained on another base than the one served (shapes fitting): flagged by default,
held under strict_base_match until an operator accepts it. QLoRA adapters name the quantised copy
they were trained on (`unsloth/llama-3-8b-bnb-4bit`), so a name alone refuses nothing by default.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openai import NotFoundError, OpenAI

from appliance.api.adminclient import AdminClient
from appliance.config.settings import load_config
from appliance.demo.build import init_demo
from appliance.ops import doctor
from appliance.tenancy.store import Store
from appliance.testing.localserver import LocalServer, ServerFailed
from tests.conftest import SERVER_START_TIMEOUT_S, Demo, Reference, Server

OTHER_BASE = "unsloth/llama-3-8b-bnb-4bit"
PROMPT = "The quick brown fox"
MAX_TOKENS = 12


def drop_trained_elsewhere(demo: Demo, tenant: str) -> str:
    """acme's adapter, its config naming another base, dropped for `tenant`; returns its key."""
    with Store.open(demo.database) as store:
        store.add_tenant(tenant)
        key = store.issue_key(tenant).plaintext
    staged = demo.dir / "adapters" / tenant / ".v1.partial"
    shutil.copytree(demo.adapter_dir("acme"), staged)
    config = json.loads((staged / "adapter_config.json").read_text())
    (staged / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": OTHER_BASE}))
    staged.rename(staged.with_name("v1"))
    return key


def row(demo: Demo, tenant: str) -> dict[str, Any] | None:
    rows = AdminClient(demo.dir / "state" / "admin.sock").call("GET", "/admin/adapters")["adapters"]
    return next((r for r in rows if r["tenant"] == tenant), None)


def wait_for(predicate: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
    return value


def complete(url: str, key: str, model: str) -> str:
    client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].text


def cli(demo: Demo, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", *args, "--config", str(demo.config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def bases_check(demo: Demo) -> doctor.Check:
    box = doctor.Box(load_config(demo.config), demo.config, None, doctor.DEFAULT_SERVICE_USER)
    return doctor.check_adapter_bases(box)


def expected(reference: Reference) -> str:
    return reference.text(reference.generate("acme", reference.prompt_ids(PROMPT), MAX_TOKENS))


def test_another_base_serves_flagged_with_both_names(server: Server, reference: Reference) -> None:
    demo = server.demo
    key = drop_trained_elsewhere(demo, "qlora-flagged")
    found = wait_for(lambda: (r := row(demo, "qlora-flagged")) and r["state"] == "ready" and r)
    note = f"trained on '{OTHER_BASE}'; this box serves 'lorabox-demo'"
    assert (found["note"], found["base_model"], found["reason"]) == (note, OTHER_BASE, "")
    assert complete(server.base_url, key, "qlora-flagged") == expected(reference)

    events = AdminClient(demo.dir / "state" / "admin.sock").call("GET", "/admin/events?limit=1000")["events"]
    flagged = [e for e in events if (e["kind"], e["tenant"]) == ("adapter_base_mismatch", "qlora-flagged")]
    assert [e["detail"] for e in flagged] == [note]
    listed = cli(demo, "adapters", "list", "qlora-flagged")
    assert note in listed.stdout, listed.stdout + listed.stderr
    check = bases_check(demo)
    assert (check.level, "trained on another base" in check.detail) == (doctor.WARN, True)
    shutil.rmtree(demo.dir / "adapters" / "qlora-flagged")


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, LocalServer]]:
    """A daemon of its own with strict_base_match = true (llama.cpp: the quickest to start)."""
    directory = tmp_path_factory.mktemp("strict")
    box = Demo(directory, init_demo(directory))
    try:
        server = LocalServer.start(
            box.config,
            directory / "server.log",
            timeout_s=SERVER_START_TIMEOUT_S,
            env={"LORABOX_ENGINE": "llamacpp"},
            settings={"strict_base_match": "true"},
        )
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield box, server
    server.stop()


def test_strict_base_match_holds_another_base_until_accepted(
    strict: tuple[Demo, LocalServer], reference: Reference
) -> None:
    demo, server = strict
    key = drop_trained_elsewhere(demo, "qlora")
    held = wait_for(lambda: (r := row(demo, "qlora")) and r["state"] == "held" and r)
    assert held["reason"] == (
        f"trained on '{OTHER_BASE}'; this box serves 'lorabox-demo'; strict_base_match holds it until "
        "`lorabox adapters accept qlora v1`"
    )
    with pytest.raises(NotFoundError):
        complete(server.base_url, key, "qlora")
    assert all(r["state"] == "ready" for r in [row(demo, t) for t in demo.keys])  # the demo's own base
    assert "1 held by strict_base_match" in bases_check(demo).detail
    listed = cli(demo, "adapters", "list", "qlora")
    assert "held" in listed.stdout
    assert "lorabox adapters accept qlora v1" in listed.stdout

    accepted = cli(demo, "adapters", "accept", "qlora", "v1")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "qlora@v1 accepted although trained on another base: ready"
    assert wait_for(lambda: row(demo, "qlora")["state"] == "ready")  # type: ignore[index]
    assert complete(server.base_url, key, "qlora") == expected(reference)
    refused = cli(demo, "adapters", "accept", "acme", "v1")  # names the served base: nothing to accept
    assert refused.returncode != 0
    assert "names the served base model: nothing to accept" in refused.stderr
