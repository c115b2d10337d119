"""python -m benchmarks [NAME [options]]: run one benchmark, or list them with the first line of each
one's docstring. A benchmark is a module of this package with a `main()` that reads sys.argv."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).parent


def available() -> dict[str, str]:
    """Every benchmark's name and the first line of its docstring, read without importing it (some
    import vLLM)."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            found[path.stem.replace("_", "-")] = (ast.get_docstring(tree) or "").strip().splitlines()[0]
    return found


def main() -> None:
    names = available()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.splitlines()[0])
        for name, line in names.items():
            print(f"  {name:<18} {line}")
        return
    name = sys.argv[1].replace("_", "-")
    if name not in names:
        sys.exit(f"no benchmark {sys.argv[1]!r}: one of {', '.join(names)}")
    sys.argv = [f"python -m benchmarks {name}", *sys.argv[2:]]
    importlib.import_module(f"benchmarks.{name.replace('-', '_')}").main()


if __name__ == "__main__":
    main()
