"""`lorabox export`: a tenant's model as one GGUF that plain llama.cpp runs on its own, like lorabox.

The exported files are loaded with llama-cpp-python's ordinary high-level API, no adapter, its own
tokenizer and chat template (from the GGUF): they must answer as the tenant does through lorabox.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest
from openai import OpenAI

from appliance.api.adminclient import AdminClient, AdminError
from appliance.tenancy.store import Store
from tests.conftest import Server, no_loop_stall
from tests.test_tenant_outputs import CHATS, PROMPTS

TENANT = "globex"  # adapts q, k, v and o: the rows llama.cpp lays out differently are all merged
MAX_TOKENS = 16


def plain_llama(path: Path) -> llama_cpp.Llama:
    """llama.cpp as anyone would run the file; f32 KV and no flash attention, as lorabox runs fp32."""
    return llama_cpp.Llama(
        str(path),
        n_ctx=512,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )


def export(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance", "export", *args, "--config", str(server.demo.config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def lorabox_answers(llamacpp_server: Server) -> dict[str, list[str]]:
    client = OpenAI(
        base_url=llamacpp_server.base_url, api_key=llamacpp_server.demo.keys[TENANT], max_retries=0
    )
    completions = [
        client.completions.create(model=TENANT, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]
    chats = [
        client.chat.completions.create(model=TENANT, messages=m, max_tokens=MAX_TOKENS, temperature=0)
        .choices[0]
        .message.content
        for m in CHATS
    ]
    return {"completions": completions, "chats": chats}


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_export_runs_alone_and_answers_as_the_tenant_does(llamacpp_server, lorabox_answers, tmp_path, quant):
    out = tmp_path / f"{TENANT}.gguf"
    done = export(llamacpp_server, TENANT, "--quant", quant, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    with Store.open(llamacpp_server.demo.database) as store:
        recorded = [json.loads(r["after"]) for r in store.audit_log(TENANT) if r["action"] == "export"]
    assert {"path": str(out), "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}.items() <= recorded[
        0
    ].items()

    llm = plain_llama(out)
    try:
        completions = [
            llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"]
            for p in PROMPTS
        ]
        chats = [
            llm.create_chat_completion(m, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["message"][
                "content"
            ]
            for m in CHATS
        ]
    finally:
        llm.close()
    assert completions == lorabox_answers["completions"]
    assert chats == lorabox_answers["chats"]
    modelfile = (tmp_path / f"{TENANT}.Modelfile").read_text()
    assert f"FROM ./{TENANT}.gguf" in modelfile
    assert "TEMPLATE" in modelfile


def test_quantised_export_through_the_admin_api_loads_and_answers(llamacpp_server):
    demo = llamacpp_server.demo
    admin = AdminClient(demo.dir / "state" / "admin.sock", timeout_s=300)
    with no_loop_stall(demo):  # the export runs off the event loop
        result = admin.call("POST", f"/admin/tenants/{TENANT}/export", {"quant": "q4_k_m", "name": "q4.gguf"})
    assert (result["tenant"], result["version"], result["quant"]) == (TENANT, "v1", "q4_k_m")
    out = Path(result["path"])
    assert out == demo.dir / "state" / "exports" / "q4.gguf"  # the exports directory, nowhere else
    assert out.stat().st_size == result["size_bytes"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert hashlib.sha256(out.read_bytes()).hexdigest() == result["sha256"]
    f32_size = (demo.dir / "model.gguf").stat().st_size
    assert result["size_bytes"] < f32_size / 3  # quantised, not a float copy

    llm = plain_llama(out)
    try:
        answer = llm.create_completion(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)["choices"][0]
    finally:
        llm.close()
    assert answer["text"].strip()
    assert answer["finish_reason"] in ("length", "stop")

    audit = admin.call("GET", f"/admin/audit?tenant={TENANT}")["audit"]
    [exported] = [r for r in audit if r["action"] == "export" and "q4.gguf" in r["after"]]
    assert json.loads(exported["after"]) == {
        "version": "v1",
        "quant": "q4_k_m",
        "name": "q4.gguf",
        "size_bytes": result["size_bytes"],
        "sha256": result["sha256"],
    }
    assert exported["actor"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"name": "../x.gguf"}, 400, "must be a file name"),
        ({"name": "/etc/lorabox-x.gguf"}, 400, "must be a file name"),
        ({"name": "sub/x.gguf"}, 400, "must be a file name"),
        ({"name": ".hidden.gguf"}, 400, "must be a file name"),
        ({"out": "/etc/lorabox-x.gguf"}, 400, "out is not accepted"),
        ({"quant": "q3_wishful"}, 400, "quant must be one of"),
        ({"version": "v9"}, 409, "no servable adapter"),
    ],
)
def test_an_export_outside_the_exports_directory_is_refused_and_audited(
    llamacpp_server, body, status, message
):
    admin = AdminClient(llamacpp_server.demo.dir / "state" / "admin.sock", timeout_s=300)
    with pytest.raises(AdminError, match=message) as refused:
        admin.call("POST", f"/admin/tenants/{TENANT}/export", body)
    assert refused.value.status == status
    [latest] = admin.call("GET", f"/admin/audit?tenant={TENANT}&limit=1")["audit"]
    assert latest["action"] == "export_refused"
    assert message in json.loads(latest["after"])["refused"]
    for value in body.values():
        assert value in latest["after"]  # what was asked for, as asked
    assert not Path("/etc/lorabox-x.gguf").exists()
    assert not (llamacpp_server.demo.dir / "state" / "x.gguf").exists()


def test_an_existing_export_is_kept_unless_overwriting_is_asked_and_a_link_is_never_followed(
    llamacpp_server, tmp_path
):
    exports = llamacpp_server.demo.dir / "state" / "exports"
    admin = AdminClient(llamacpp_server.demo.dir / "state" / "admin.sock", timeout_s=300)
    exports.mkdir(exist_ok=True)
    kept = exports / "kept.gguf"
    kept.write_bytes(b"an operator's earlier export")
    with pytest.raises(AdminError, match="exists") as refused:
        admin.call("POST", f"/admin/tenants/{TENANT}/export", {"name": "kept.gguf"})
    assert refused.value.status == 409
    assert kept.read_bytes() == b"an operator's earlier export"
    victim = tmp_path / "root-owned.txt"
    victim.write_text("not lorabox's")
    (exports / "link.gguf").symlink_to(victim)
    for overwrite in (False, True):
        with pytest.raises(AdminError, match="not a plain file"):
            admin.call(
                "POST", f"/admin/tenants/{TENANT}/export", {"name": "link.gguf", "overwrite": overwrite}
            )
    assert victim.read_text() == "not lorabox's"
    result = admin.call("POST", f"/admin/tenants/{TENANT}/export", {"name": "kept.gguf", "overwrite": True})
    assert kept.stat().st_size == result["size_bytes"] > 1000


def test_export_of_unknown_version_fails_with_a_reason(llamacpp_server, tmp_path):
    done = export(llamacpp_server, TENANT, "--version", "v9", "--out", str(tmp_path / "x.gguf"))
    assert done.returncode == 1
    assert "globex@v9 has no servable adapter" in done.stderr
    assert not (tmp_path / "x.gguf").exists()
