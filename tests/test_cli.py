"""The `lorabox` command, run in-process against a temporary state directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from appliance.api.admin import peer_user
from appliance.api.adminclient import AdminClient
from appliance.config.settings import load_config
from appliance.ops.cli import main
from appliance.tenancy.audit import local_user
from appliance.tenancy.store import AdapterVersion, Route, Store
from appliance.testing.adminreplay import AdminReplay
from tests.conftest import bounded


@dataclass
class Box:
    config: Path
    state_dir: Path
    adapters_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "lorabox.db"


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def box(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Box:
    for name in list(os.environ):
        if name.startswith("LORABOX_"):
            monkeypatch.delenv(name)
    state_dir, adapters_dir = tmp_path / "state", tmp_path / "adapters"
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{state_dir}"\nadapters_dir = "{adapters_dir}"\nport = 9123\n')
    return Box(config, state_dir, adapters_dir)


Run = Callable[..., Result]


@pytest.fixture
def run(box: Box, capsys: pytest.CaptureFixture[str]) -> Run:
    """lorabox ARGS... with --config pointing at the box (appended to the innermost command)."""

    def run(*args: str, config: bool = True) -> Result:
        argv = [*args, "--config", str(box.config)] if config else list(args)
        code = main(argv)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.code == 1
    assert result.err.startswith("lorabox: ")
    assert result.err.count("\n") == 1
    assert fragment in result.err
    assert "Traceback" not in result.err
    assert result.out == ""


# -- tenants ------------------------------------------------------------------------------------


def test_tenant_add(run: Run, box: Box) -> None:
    result = run("tenant", "add", "acme")
    assert result.code == 0
    assert "added tenant acme" in result.out
    assert "lorabox key issue acme" in result.out
    with Store.open(box.database) as store:
        tenant = store.get_tenant("acme")
    assert tenant is not None
    assert not tenant.allow_base_model


def test_tenant_add_allow_base(run: Run, box: Box) -> None:
    assert "may use the base model" in run("tenant", "add", "globex", "--allow-base").out
    with Store.open(box.database) as store:
        tenant = store.get_tenant("globex")
    assert tenant is not None
    assert tenant.allow_base_model


@pytest.mark.parametrize("name", ["bad name", "Acme", "../x", "café", "-x"])
def test_tenant_add_bad_name(run: Run, box: Box, name: str) -> None:
    result = run("tenant", "add", "--config", str(box.config), "--", name, config=False)
    assert_one_line_error(result, "invalid tenant name")
    with Store.open(box.database) as store:
        assert store.list_tenants() == []


def test_tenant_add_twice(run: Run) -> None:
    assert run("tenant", "add", "acme").code == 0
    assert_one_line_error(run("tenant", "add", "acme"), "already exists")


def test_tenant_list(run: Run) -> None:
    run("tenant", "add", "globex")
    run("tenant", "add", "acme", "--allow-base")
    result = run("tenant", "list")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split() == ["NAME", "ALLOW_BASE_MODEL", "DISABLED", "CREATED_AT"]
    assert [row.split()[:3] for row in rows] == [["acme", "True", "False"], ["globex", "False", "False"]]


# -- keys ---------------------------------------------------------------------------------------


def test_key_issue_prints_the_key_once(run: Run, box: Box) -> None:
    run("tenant", "add", "acme")
    result = run("key", "issue", "acme")
    assert result.code == 0
    (key,) = result.out.splitlines()
    assert key.startswith("lbx-")
    assert key not in result.err
    assert "shown once" in result.err
    with Store.open(box.database) as store:
        assert store.tenant_for_key(key) == "acme"
        (row,) = store.list_keys("acme")
    assert row["key_id"] in result.err


def test_key_list_shows_ids_never_keys(run: Run) -> None:
    run("tenant", "add", "acme")
    run("tenant", "add", "globex")
    key = run("key", "issue", "acme").out.strip()
    other = run("key", "issue", "globex").out.strip()
    key_id, secret = key.split("-", 2)[1:]
    result = run("key", "list", "acme")
    assert result.code == 0
    assert key_id in result.out
    assert other.split("-")[1] not in result.out
    assert secret not in result.out
    assert key not in result.out
    everything = run("key", "list").out
    assert key_id in everything
    assert other.split("-")[1] in everything
    assert secret not in everything


def test_key_revoke(run: Run, box: Box) -> None:
    run("tenant", "add", "acme")
    key = run("key", "issue", "acme").out.strip()
    keep = run("key", "issue", "acme").out.strip()
    key_id = key.split("-")[1]
    result = run("key", "revoke", key_id)
    assert result.code == 0
    assert f"revoked key {key_id} of tenant acme" in result.out
    with Store.open(box.database) as store:
        assert store.tenant_for_key(key) is None
        assert store.tenant_for_key(keep) == "acme"
    (line,) = [row for row in run("key", "list", "acme").out.splitlines() if key_id in row]
    assert len(line.split()) == 4  # the REVOKED_AT column is filled


def test_key_revoke_unknown(run: Run) -> None:
    assert_one_line_error(run("key", "revoke", "deadbeef"), "no key with id 'deadbeef'")


def test_key_issue_unknown_tenant(run: Run) -> None:
    assert_one_line_error(run("key", "issue", "nosuchtenant"), "no tenant named 'nosuchtenant'")


# -- adapters, usage, config --------------------------------------------------------------------


def table(output: str) -> list[dict[str, str]]:
    """Rows of a `_table` printout, split at the header's column starts (cells may be blank)."""
    header, *lines = output.splitlines()
    names = header.split()
    starts = [header.index(name) for name in names]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for line in lines]


def test_adapters_list_without_the_daemon(run: Run, box: Box) -> None:
    empty = run("adapters", "list")
    assert empty.code == 0
    assert {"TENANT", "VERSION", "ACTIVE", "STATE", "SHA256", "REASON"} <= set(empty.out.split())
    assert table(empty.out) == []

    def version(name: str, state: str = "ready", reason: str = "") -> AdapterVersion:
        return AdapterVersion("acme", name, f"/a/{name}", name * 32, 8, 16.0, ("q_proj",), 100, state, reason)

    with Store.open(box.database) as store:
        store.register_adapter(version("v2"))
        store.register_adapter(version("v9"))
        store.register_adapter(version("v10", "refused", "incomplete safetensors file"))
        store.save_route(Route("acme", active_version="v9"))
    result = run("adapters", "list")
    assert result.code == 0
    rows = {row["VERSION"]: row for row in table(result.out)}
    assert set(rows) == {"v2", "v9", "v10"}
    assert {v: (r["TENANT"], r["STATE"], r["ACTIVE"]) for v, r in rows.items()} == {
        "v2": ("acme", "ready", ""),
        "v9": ("acme", "ready", "*"),
        "v10": ("acme", "refused", ""),
    }
    assert rows["v10"]["REASON"] == "incomplete safetensors file"
    assert rows["v9"]["SHA256"] == "v9" * 6  # shortened to 12 characters
    assert table(run("adapters", "list", "globex").out) == []


@pytest.mark.parametrize(
    "argv",
    [["activate", "acme", "v1"], ["unpin", "acme"], ["canary", "acme", "v2", "--percent", "10"]],
    ids=["activate", "unpin", "canary"],
)
def test_adapter_routing_needs_the_daemon(run: Run, argv: list[str]) -> None:
    assert_one_line_error(run("adapters", *argv), "admin socket")


def test_residency_pin_without_the_daemon_applies_at_next_start(run: Run, box: Box) -> None:
    run("tenant", "add", "acme")
    result = run("residency", "pin", "acme")
    assert result.code == 0, result.err
    assert "applies when the daemon starts" in result.out
    with Store.open(box.database) as store:
        assert store.route("acme").keep_resident
    assert run("residency", "unpin", "acme").code == 0
    with Store.open(box.database) as store:
        assert not store.route("acme").keep_resident
    kinds = [row["KIND"] for row in table(run("events").out)]
    assert kinds[-2:] == ["residency_kept", "residency_released"]


def test_residency_pin_unknown_tenant(run: Run, box: Box) -> None:
    assert_one_line_error(run("residency", "pin", "nobody"), "unknown tenant 'nobody'")
    with Store.open(box.database) as store:
        assert store.routes() == []


def test_residency_report_needs_the_daemon(run: Run) -> None:
    assert_one_line_error(run("residency"), "admin socket")


def test_events(run: Run) -> None:
    run("tenant", "add", "acme")
    run("key", "issue", "acme")
    result = run("events")
    assert result.code == 0
    assert [(row["KIND"], row["TENANT"]) for row in table(result.out)] == [
        ("tenant_added", "acme"),
        ("key_issued", "acme"),
    ]


def test_usage(run: Run, box: Box) -> None:
    rows = [
        {"tenant": "acme", "prompt_tokens": 10, "completion_tokens": 4},
        {"tenant": "acme", "prompt_tokens": 5, "completion_tokens": 1},
        {"tenant": "globex", "prompt_tokens": 3, "completion_tokens": 2},
    ]
    with Store.open(box.database) as store:
        store.record_usage(rows)
    result = run("usage")
    assert result.code == 0
    lines = [line.split() for line in result.out.splitlines()]
    assert lines == [
        ["TENANT", "TIER", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "COST"],
        ["acme", "default", "2", "15", "5", "0.0000"],
        ["globex", "default", "1", "3", "2", "0.0000"],
    ]
    only_globex = run("usage", "globex").out.splitlines()[1:]
    assert [line.split() for line in only_globex] == [["globex", "default", "1", "3", "2", "0.0000"]]


def test_usage_shows_batch_and_flex_apart_from_interactive(run: Run, box: Box) -> None:
    def row(tier: str | None, prompt: int, price: float) -> dict:  # type: ignore[type-arg]
        return {"tenant": "acme", "tier": tier, "prompt_tokens": prompt, "completion_tokens": 0} | {
            "price_in": price,
            "batch_id": "batch_1" if tier == "batch" else None,
        }

    with Store.open(box.database) as store:
        store.record_usage(
            [
                row(None, 1_000_000, 2.0),
                row("default", 1_000_000, 2.0),
                row("batch", 2_000_000, 1.0),
                row("flex", 1_000_000, 1.0),
            ]
        )
    assert [line.split() for line in run("usage").out.splitlines()] == [
        ["TENANT", "TIER", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "COST"],
        ["acme", "default", "2", "2000000", "0", "4.0000"],  # rows from before tiers: interactive
        ["acme", "flex", "1", "1000000", "0", "1.0000"],
        ["acme", "batch", "1", "2000000", "0", "2.0000"],
    ]


def test_usage_by_day_in_a_window_with_the_prices_each_request_was_served_at(run: Run, box: Box) -> None:
    def row(ts: str, tenant: str, prompt: int, completion: int, price_in: float, price_out: float) -> dict:  # type: ignore[type-arg]
        return {"ts": ts, "tenant": tenant, "prompt_tokens": prompt, "completion_tokens": completion} | {
            "price_in": price_in,
            "price_out": price_out,
        }

    with Store.open(box.database) as store:
        store.record_usage(
            [
                row("2026-10-31T23:59:59.000+00:00", "acme", 1_000_000, 0, 9.0, 9.0),  # before --since
                row("2026-11-01T08:00:00.000+00:00", "acme", 1_000_000, 1_000_000, 0.2, 0.6),
                row("2026-11-01T09:00:00.000+00:00", "acme", 500_000, 0, 0.4, 0.6),  # the price went up
                row("2026-11-02T10:00:00.000+00:00", "acme", 0, 2_000_000, 0.4, 1.0),
                row("2026-11-03T00:00:00.000+00:00", "acme", 7, 7, 1.0, 1.0),  # at --until: left out
            ]
        )
    result = run("usage", "--tenant", "acme", "--since", "2026-11-01", "--until", "2026-11-03", "--by", "day")
    assert [line.split() for line in result.out.splitlines()] == [
        ["PERIOD", "TENANT", "TIER", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "COST"],
        ["2026-11-01", "acme", "default", "2", "1500000", "1000000", "1.0000"],  # 0.2 + 0.6 + 0.5 * 0.4
        ["2026-11-02", "acme", "default", "1", "0", "2000000", "2.0000"],
    ]
    csv_lines = run("usage", "--since", "2026-11-01", "--by", "month", "--csv").out.splitlines()
    with Store.open(box.database) as store:
        box_id = store.box_id()  # rows booked without one are this box's
    assert csv_lines == [
        "period,tenant,tier,requests,prompt_tokens,completion_tokens,cost,box_id",
        f"2026-11,acme,default,4,1500007,3000007,3.000014,{box_id}",
    ]
    assert run("usage", "--since", "7d").code == 0  # relative to now: nothing that old in this box
    assert_one_line_error(run("usage", "--since", "last tuesday"), "--since: use e.g. 7d")


# -- policies and the audit log -----------------------------------------------------------------


def test_tenant_set_without_a_daemon_writes_the_policy_and_show_reads_it(
    run: Run, box: Box, tmp_path: Path
) -> None:
    run("tenant", "add", "acme")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are Acme's support desk.")
    result = run(
        "tenant", "set", "acme", "--weight", "2", "--rpm", "60", "--tpm", "none", "--max-queued", "5",
        "--quota-tokens", "5000000", "--quota-period", "week", "--system-prompt-file", str(prompt),
        "--price-in", "0.20", "--price-out", "0.60",
    )  # fmt: skip
    assert result.code == 0, result.err
    with Store.open(box.database) as store:
        assert store.policy_values("acme") == {
            "weight": 2.0, "rpm": 60, "tpm": None, "max_queued": 5, "quota_tokens": 5_000_000,
            "quota_period": "week", "system_prompt": "You are Acme's support desk.", "price_in": 0.2,
            "price_out": 0.6,
        }  # fmt: skip
    assert run("tenant", "set", "acme", "--rpm", "default").code == 0
    shown = {line.split()[0]: line for line in run("tenant", "show", "acme").out.splitlines()}
    assert shown["weight"].split()[1:] == ["2.0", "(tenant)"]
    assert shown["rpm"].split()[1:] == ["none", "(default)"]
    assert shown["tpm"].split()[1:] == ["none", "(tenant)"]
    assert shown["system_prompt"].split()[1:3] == ["28", "characters,"]
    assert "quota: 0 tokens used of 5,000,000 (0.0%)" in run("tenant", "show", "acme").out


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--rpm", "-1", "rpm"),
        ("--tpm", "1e30", "tpm"),
        ("--tpm", "99999999999", "tpm"),
        ("--weight", "abc", "weight"),
        ("--weight", "nan", "weight"),
        ("--weight", "0", "weight"),
        ("--max-queued", "none", "max_queued"),
        ("--max-concurrent", "2.5", "max_concurrent"),
        ("--quota-period", "fortnight", "quota_period"),
        ("--price-out", "-0.5", "price_out"),
        ("--quota-warn-pct", "inf", "quota_warn_pct"),
    ],
)
def test_hostile_policy_values_are_refused_naming_the_field(
    run: Run, box: Box, option: str, value: str, field: str
) -> None:
    run("tenant", "add", "acme")
    assert_one_line_error(run("tenant", "set", "acme", option, value), f"{field}: ")
    with Store.open(box.database) as store:
        assert store.policy_values("acme") == {}


def test_a_1mb_system_prompt_is_refused(run: Run, box: Box, tmp_path: Path) -> None:
    run("tenant", "add", "acme")
    huge = tmp_path / "huge.txt"
    huge.write_text("Be helpful. " * 90_000)  # about 1 MB
    assert_one_line_error(
        run("tenant", "set", "acme", "--system-prompt-file", str(huge)), "system_prompt: at most 32768"
    )
    with Store.open(box.database) as store:
        assert store.policy_values("acme") == {}


def test_audit_names_the_actor_and_what_changed(run: Run, box: Box) -> None:
    import getpass

    run("tenant", "add", "acme")
    run("key", "issue", "acme")
    with Store.open(box.database) as store:
        key_id = store.list_keys("acme")[0]["key_id"]
    run("key", "revoke", key_id)
    run("tenant", "set", "acme", "--rpm", "60")
    run("tenant", "set", "acme", "--rpm", "120", "--tpm", "40000")
    run("residency", "pin", "acme")
    rows = table(run("audit", "--tenant", "acme").out)
    assert [r["ACTION"] for r in rows] == [
        "tenant_add", "key_issue", "key_revoke", "tenant_set", "tenant_set", "residency_pin"
    ]  # fmt: skip
    assert {r["ACTOR"] for r in rows} == {getpass.getuser()}
    assert rows[2]["CHANGE"] == f"key {key_id} active → revoked"
    assert rows[4]["CHANGE"] == "rpm 60 → 120, tpm (default) → 40000"
    assert rows[5]["CHANGE"] == "keep_resident False → True"


def test_config_prints_effective_values(run: Run, box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORABOX_MAX_LORA_RANK", "32")
    result = run("config")
    assert result.code == 0
    assert result.out.splitlines()[0] == f"# from {box.config}"
    settings_lines = result.out.split("\n\n[tenant_defaults]\n")[0].splitlines()[1:]
    values = dict(line.split(" = ", 1) for line in settings_lines)
    assert "9123" in values["port"]
    assert "32" in values["max_lora_rank"]
    assert str(box.state_dir) in values["state_dir"]
    assert str(box.adapters_dir) in values["adapters_dir"]
    assert "127.0.0.1" in values["host"]
    assert "source" not in values


def test_config_output_reads_back_as_the_same_settings(run: Run, box: Box, tmp_path: Path) -> None:
    printed = run("config").out
    copy = tmp_path / "copy.toml"
    copy.write_text(printed)
    assert load_config(copy, env={}) == load_config(box.config, env={})


def test_missing_config_file(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert_one_line_error(run("tenant", "list", "--config", str(missing), config=False), "not found")


def test_invalid_config_file(run: Run, box: Box) -> None:
    box.config.write_text("prot = 1\n")
    assert_one_line_error(run("config"), "unknown setting(s): prot")


# -- where --config may go ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["tenant", "--config", "{config}", "add", "foo"],
        ["tenant", "add", "--config", "{config}", "foo"],
        ["tenant", "add", "foo", "--config", "{config}"],
    ],
    ids=["before-action", "after-action", "at-the-end"],
)
def test_config_option_anywhere_in_a_nested_command(run: Run, box: Box, argv: list[str]) -> None:
    result = run(*[a.format(config=box.config) for a in argv], config=False)
    assert result.code == 0, result.err
    with Store.open(box.database) as store:
        assert store.get_tenant("foo") is not None


def test_config_option_before_a_nested_key_command(run: Run, box: Box) -> None:
    run("tenant", "add", "acme")
    result = run("key", "--config", str(box.config), "issue", "acme", config=False)
    assert result.code == 0
    with Store.open(box.database) as store:
        assert store.tenant_for_key(result.out.strip()) == "acme"


def test_unknown_command_is_a_usage_error(run: Run) -> None:
    with pytest.raises(SystemExit) as caught:
        run("tenant", "rename", "acme")
    assert caught.value.code == 2


def test_unusable_state_dir_is_a_one_line_error(run: Run, box: Box, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    box.config.write_text(f'state_dir = "{blocker / "state"}"\n')
    assert_one_line_error(run("tenant", "list"), "state")


# -- the edge: what an operator may type ----------------------------------------------------------

# Each of these crashed the CLI with a traceback, hung it, was taken as something else, or changed
# another tenant (issue 16, point 7). {fifo} is a FIFO nobody writes to.
HOSTILE = [
    (["tenant", "set", "acme/../globex", "--rpm", "5"], "invalid tenant name 'acme/../globex'"),
    (["tenant", "set", "acme?x=1", "--rpm", "5"], "invalid tenant name 'acme?x=1'"),
    (["tenant", "show", "acme/../globex"], "invalid tenant name"),
    (["adapters", "activate", "acme/../globex", "v1"], "invalid tenant name"),
    (["adapters", "canary", "..", "v1", "--percent", "5"], "invalid tenant name"),
    (["residency", "pin", "acme%2F..%2Fglobex"], "invalid tenant name"),
    (["key", "issue", "globex/"], "invalid tenant name"),
    (["usage", "--since", "999999999d"], "--since: at most 100 years ago"),
    (["usage", "--until", "yesterday"], "--until: use e.g."),
    (["audit", "--limit", "99999999999999999999"], "--limit: must be a whole number from 1 to 10000"),
    (["events", "--limit", "99999999999999999999"], "--limit: must be a whole number from 1 to 10000"),
    (["events", "--limit", "١٢٣"], "--limit: must be a whole number"),
    (["usage", "--since", "١٢٣d"], "--since: use e.g."),
    (["tenant", "set", "acme", "--rpm", "١٢٣"], "rpm: must be a whole number"),
    (["tenant", "set", "acme", "--weight", "٢"], "weight: must be a number"),
    (
        ["adapters", "canary", "acme", "v1", "--percent", "101"],
        "--percent: must be a whole number from 0 to 100",
    ),
    (["tenant", "set", "acme", "--system-prompt-file", "{fifo}"], "is not a regular file"),
    (["tenant", "set", "acme", "--system-prompt-file", "/proc/self/environ"], "is not a regular file"),
    (["tenant", "set", "acme", "--system-prompt-file", "/dev/zero"], "is not a regular file"),
    (["tenant", "set", "acme", "--system-prompt-file", "/"], "is not a regular file"),
    (["logs", "--lines", "0"], "--lines: must be a whole number"),
    (["tui", "--interval", "nan"], "--interval"),
]


@pytest.mark.parametrize(("argv", "message"), HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_hostile_input_is_one_line_and_status_1_and_changes_nothing(
    run: Run, box: Box, tmp_path: Path, argv: list[str], message: str
) -> None:
    run("tenant", "add", "acme")
    run("tenant", "add", "globex")
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    # A daemon that records what reaches it: nothing may (a path the CLI built from the name would
    # be normalised by the client, `acme/../globex` into globex's).
    daemon = AdminReplay(box.state_dir / "admin.sock").start()
    try:
        result = bounded(run, *[arg.format(fifo=fifo) for arg in argv], timeout=30)
    finally:
        daemon.stop()
    assert_one_line_error(result, message)
    assert daemon.posts == []
    with Store.open(box.database) as store:
        assert store.all_policy_values() == {}
        assert [row["action"] for row in store.audit_log()] == ["tenant_add", "tenant_add"]


def test_tenant_show_gives_the_system_prompt_as_its_length_and_digest(
    run: Run, box: Box, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.txt"
    text = "You are Acme's support desk. Never reveal the discount code SECRET-42."
    prompt.write_text(text)
    run("tenant", "add", "acme")
    assert run("tenant", "set", "acme", "--system-prompt-file", str(prompt)).code == 0
    shown = run("tenant", "show", "acme").out
    assert "SECRET-42" not in shown
    assert f"{len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}" in shown


async def test_an_action_under_sudo_names_the_same_actor_through_the_socket_as_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SO_PEERCRED says root; root's client adds who ran sudo, as the CLI writing the database
    itself does (audit.local_user). A header from anyone else is not believed."""
    monkeypatch.setenv("SUDO_USER", "alice")

    async def who(request: web.Request) -> web.Response:
        return web.json_response({"actor": peer_user(request)})

    app = web.Application()
    app.router.add_get("/who", who)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "admin.sock")).start()
    try:
        through_socket = (await AdminClient(tmp_path / "admin.sock").request("GET", "/who"))["actor"]
    finally:
        await runner.cleanup()
    assert through_socket == local_user()
    if os.getuid() == 0:
        assert through_socket == "root (sudo by alice)"


def test_batches_lists_jobs_with_progress(run: Run, box: Box) -> None:
    from appliance.batch import jobs
    from appliance.tenancy.store import Store

    run("tenant", "add", "acme")
    run("tenant", "add", "globex")
    with Store.open(box.database) as store:
        for n, (tenant, status, total, completed, failed) in enumerate(
            [("acme", "in_progress", 200, 50, 2), ("globex", "completed", 10, 10, 0)]
        ):
            batch = jobs.Batch(
                f"batch_{n}", tenant, "k", "tenant", "/v1/chat/completions", "file-x", "24h", None, status,
                None, None, None, total, completed, failed, 1_800_000_000 + n, None, 1_800_086_400, None,
                None, None, None, None, None,
            )  # fmt: skip
            jobs.insert_batch(store, batch)
    result = run("batches")
    assert result.code == 0
    rows = table(result.out)
    assert [(r["ID"], r["STATUS"], r["PROGRESS"]) for r in rows] == [
        ("batch_1", "completed", "10/10 100%"),
        ("batch_0", "in_progress", "52/200 26%"),
    ]
    assert [r["ID"] for r in table(run("batches", "--tenant", "acme").out)] == ["batch_0"]
