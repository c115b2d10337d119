"""The commented example configuration, generated from `Settings` so that it cannot drift.

Every setting appears with its documentation (the docstring under its field in settings.py) and
its default, commented out; `values` writes chosen settings uncommented (install.sh: the paths,
the address, the model). docs/lorabox.example.toml is this output with no values; a test keeps
the two equal. Standard library only: install.sh runs it from the checkout before anything else
is installed:

    python -m appliance.config.example [--set NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..tenancy import policy
from ..tenancy.policy import Policy
from . import settings
from .settings import DEFAULTS_ENV_PREFIX, DEFAULTS_SECTION, TRUE_WORDS, Settings, setting_names

HEADER = """\
# lorabox configuration (/etc/lorabox/lorabox.toml). Every setting is optional: a commented one
# shows its default. LORABOX_<NAME> environment variables override this file (LORABOX_PORT=9000);
# `lorabox config` prints the settings in effect, `lorabox doctor` checks them.
"""


NO_LIMIT = '"none"'
TENANT_DEFAULTS_HEADER = f"""\
# Defaults for every tenant without a value of its own (`lorabox tenant set` gives one);
# {DEFAULTS_ENV_PREFIX}<NAME> environment variables override them. "none": no limit. To set one,
# uncomment the table's line below with it: a TOML table takes every line after it, so it stays
# last, and a setting added at the end of this file must go above it.
# [{DEFAULTS_SECTION}]
"""


def field_docs(module: Any = settings, cls: type = Settings) -> dict[str, str]:
    """Each field's docstring, read from its module's source (Python keeps none at run time)."""
    tree = ast.parse(inspect.getsource(module))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def toml_value(value: Any, none: str = '""') -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):  # a TOML array of basic strings (guardrail patterns)
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def example_config(values: Mapping[str, Any] | None = None) -> str:
    """The whole file: a comment block and a line per setting; `values` are set, not commented."""
    values = dict(values or {})
    unknown = set(values) - set(setting_names())
    if unknown:
        raise ValueError(f"not settings: {', '.join(sorted(unknown))}")
    docs = field_docs()
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    blocks = [HEADER]
    for name in setting_names():
        comment = "\n".join(f"# {line}".rstrip() for line in docs[name].splitlines())
        if name in values:
            line = f"{name} = {toml_value(values[name])}"
        else:
            line = f"# {name} = {toml_value(defaults[name])}"
        blocks.append(f"{comment}\n{line}\n")
    # Commented out, the table takes nothing: a top-level setting appended to the file stays one.
    blocks.append(TENANT_DEFAULTS_HEADER)
    policy_docs = field_docs(policy, Policy)
    for item in dataclasses.fields(Policy):
        comment = "\n".join(f"# {line}".rstrip() for line in policy_docs[item.name].splitlines())
        value = toml_value(item.default, none=NO_LIMIT)
        blocks.append(f"{comment}\n# {item.name} = {value}\n")
    return "\n".join(blocks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.config.example", description=__doc__)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="write NAME set")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected NAME=VALUE")
        default = next((f.default for f in dataclasses.fields(Settings) if f.name == name), None)
        # Numbers and booleans keep their type; paths and words are strings.
        if isinstance(default, bool):
            values[name] = text.lower() in TRUE_WORDS
        elif isinstance(default, int | float):
            values[name] = type(default)(text)
        else:
            values[name] = text
    try:
        sys.stdout.write(example_config(values))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
