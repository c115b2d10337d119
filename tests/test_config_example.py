"""The commented example configuration: generated from Settings, committed, and true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from appliance.config.example import example_config
from appliance.config.settings import Settings, load_config, setting_names
from appliance.ops.cli import main
from appliance.tenancy.policy import FIELDS as POLICY_FIELDS

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "lorabox.example.toml"
SETTING_LINE = re.compile(r"^# ([a-z_0-9]+) = (.*)$")


def test_the_committed_example_is_the_generated_one():
    assert COMMITTED.read_text() == example_config(), (
        "docs/lorabox.example.toml is stale: python -m appliance.config.example > docs/lorabox.example.toml"
    )


def test_it_lists_every_setting_once_with_its_documentation():
    text = example_config()
    listed = [m.group(1) for line in text.splitlines() if (m := SETTING_LINE.match(line))]
    tenant_defaults = text.partition("\n# [tenant_defaults]\n")[2]
    in_section = [m.group(1) for line in tenant_defaults.splitlines() if (m := SETTING_LINE.match(line))]
    assert listed == setting_names() + list(POLICY_FIELDS)
    assert in_section == list(POLICY_FIELDS)
    for name in setting_names():
        comment = text.split(f"# {name} = ", 1)[0].rstrip().rsplit("\n\n", 1)[-1]
        assert comment.startswith("# "), name
        assert len(comment) > 10, name


def test_uncommented_it_is_exactly_the_defaults(tmp_path: Path):
    uncommented = "\n".join(
        line[2:] if SETTING_LINE.match(line) or line == "# [tenant_defaults]" else line
        for line in example_config().splitlines()
    )
    path = tmp_path / "lorabox.toml"
    path.write_text(uncommented)
    assert load_config(path, env={}) == Settings()


def test_a_setting_appended_to_it_stays_a_top_level_setting(tmp_path: Path):
    path = tmp_path / "lorabox.toml"
    path.write_text(example_config() + "port = 9003\n")
    assert load_config(path, env={}).port == 9003


def test_chosen_values_are_written_set(tmp_path: Path):
    path = tmp_path / "lorabox.toml"
    path.write_text(example_config({"state_dir": tmp_path / "state", "port": 9001}))
    settings = load_config(path, env={})
    assert (settings.state_dir, settings.port) == (tmp_path / "state", 9001)
    assert settings.adapters_dir == Settings().adapters_dir


def test_the_module_runs_alone_as_install_sh_runs_it(tmp_path: Path):
    """Only the standard library: install.sh runs it with the checkout on the path, nothing installed."""
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-m",
            "appliance.config.example",
            "--set",
            f"state_dir={tmp_path}",
            "--set",
            "port=9002",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    path = tmp_path / "lorabox.toml"
    path.write_text(result.stdout)
    assert (load_config(path, env={}).port, load_config(path, env={}).state_dir) == (9002, tmp_path)


def test_lorabox_config_example_prints_it(capsys):
    assert main(["config", "--example"]) == 0
    assert capsys.readouterr().out == example_config()
