"""The batch panel: the background band's places and share, and each batch job's progress. Shown
only while batch work runs or waits (the overview stays as it was on a box without batches)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from ..payload import Batches, BatchJob
from .device import FREE_STYLE, bar

DONE_STYLE = "#4a90d9"
FAILED_STYLE = "red"
STATUS_STYLES = {"in_progress": "green", "validating": "cyan", "finalizing": "cyan", "cancelling": "yellow"}


def progress(job: BatchJob, width: int) -> Text:
    """Lines done (blue) and failed (red) of the total, then the rest."""
    return bar([(job.completed, DONE_STYLE), (job.failed, FAILED_STYLE)], job.total, width)


class BatchPanel(Widget):
    DEFAULT_CSS = """
    BatchPanel { height: auto; max-height: 12; border: round $primary; padding: 0 1; display: none; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._batches = Batches()
        self.border_title = "Batches"

    def show(self, batches: Batches) -> None:
        self._batches = batches
        self.display = batches.busy
        share = f"{batches.share:.0%}" if batches.share is not None else "n/a"
        places = batches.places if batches.places is not None else "?"
        self.border_title = (
            f"Batches: {batches.active} active · band {batches.running}/{places} places, "
            f"{batches.queued} waiting, {share} of what runs"
        )
        self.refresh(layout=True)

    def render(self) -> RenderResult:
        batches = self._batches
        if not batches.jobs:
            return Text("batch lines running, no job listed", style="dim")
        width = max(self.content_region.width - 62, 10)
        grid = Table.grid(padding=(0, 1))
        for _ in range(5):
            grid.add_column()
        for job in batches.jobs:
            done = job.completed + job.failed
            grid.add_row(
                Text(job.tenant, style="bold"),
                Text(job.id, style="dim"),
                Text(job.status, style=STATUS_STYLES.get(job.status, "")),
                progress(job, width),
                Text(f"{done:,}/{job.total:,}" + (f", {job.failed:,} failed" if job.failed else "")),
            )
        if batches.active > len(batches.jobs):
            grid.add_row(Text(f"+{batches.active - len(batches.jobs)} more", style=FREE_STYLE))
        return grid
