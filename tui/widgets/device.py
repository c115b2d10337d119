"""The hardware panel: each GPU with a VRAM bar split by use, or a plain "CPU only" panel."""

from __future__ import annotations

from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from .. import format as fmt
from ..payload import EngineStats, Gpu, Host, Status, VramSplit

BAR = "█"
FREE = "░"
FREE_STYLE = "grey30"
SPLIT_STYLES = {
    "base weights": "#4a90d9",
    "KV cache": "#e3a33b",
    "adapter slots": "#b06ae8",
    "other": "#9a9a9a",
}
USED_STYLE = "#4a90d9"


def bar(parts: list[tuple[float, str]], total: float | None, width: int) -> Text:
    """`parts` (bytes, style) laid end to end on `width` cells of `total`; the rest shows as free."""
    line = Text()
    if not total or total <= 0 or width <= 0:
        return line.append(FREE * max(width, 0), style=FREE_STYLE)
    drawn, end_bytes = 0, 0.0
    for value, style in parts:
        end_bytes += max(value, 0.0)
        end = min(width, round(end_bytes / total * width))
        if end > drawn:
            line.append(BAR * (end - drawn), style=style)
            drawn = end
    return line.append(FREE * (width - drawn), style=FREE_STYLE)


def legend(entries: list[tuple[str, float | None, str]]) -> Text:
    line = Text("     ")
    for label, value, style in entries:
        line.append(BAR if style != FREE_STYLE else FREE, style=style)
        line.append(f" {label} ", style="dim")
        line.append(fmt.size(value))
        line.append("    ")
    return line


def split_parts(gpu: Gpu, split: VramSplit) -> list[tuple[str, float | None]]:
    known = [split.base_weights, split.kv_cache, split.adapter_slots]
    other = split.other
    if gpu.memory_used is not None:
        # Whatever the engine does not account for (CUDA context, other processes) is "other",
        # so the bar adds up to what the GPU reports as used.
        other = max(gpu.memory_used - sum(v or 0.0 for v in known), 0.0)
    return list(zip(SPLIT_STYLES, [*known, other], strict=True))


class DevicePanel(Widget):
    DEFAULT_CSS = """
    DevicePanel { height: auto; border: round $primary; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._status: Status | None = None
        self.border_title = "Device"

    def show(self, status: Status) -> None:
        self._status = status
        device = status.device
        self.border_title = (
            "CPU only" if device.kind == "cpu" else "GPU" if device.kind == "gpu" or device.gpus else "Device"
        )
        self.refresh(layout=True)

    def render(self) -> RenderResult:
        status, width = self._status, max(self.content_region.width, 20)
        if status is None:
            return Text("no data from the daemon yet", style="dim")
        device = status.device
        if device.kind == "cpu":
            lines = self._cpu(device.host, width)
        elif device.kind == "gpu" or device.gpus:
            lines = self._gpus(device.gpus, device.vram_split, width)
        else:
            lines = [Text(f"{fmt.NA}: the daemon does not report its hardware", style="dim")]
        lines.append(self._engine(status))
        return Text("\n").join(lines)

    def _gpus(self, gpus: tuple[Gpu, ...], split: VramSplit | None, width: int) -> list[Text]:
        if not gpus:
            return [Text(f"GPU {fmt.NA}: the daemon cannot read the GPU (NVML)", style="dim")]
        lines = []
        for number, gpu in enumerate(gpus):
            heading = Text()
            heading.append(f"GPU {fmt.text(gpu.index)} ", style="bold")
            heading.append(f"{fmt.text(gpu.name)}    ")
            power = fmt.unit(gpu.power_w, "")
            if gpu.power_limit_w is not None:
                power += f" / {gpu.power_limit_w:.0f}"
            for label, value in (
                ("util", fmt.pct(gpu.utilization_pct)),
                ("temp", fmt.unit(gpu.temperature_c, "°C")),
                ("power", power + (" W" if gpu.power_w is not None else "")),
                ("VRAM", f"{fmt.size(gpu.memory_used)} / {fmt.size(gpu.memory_total)}"),
                ("lorabox", fmt.size(gpu.process_memory)),
            ):
                heading.append(f"{label} ", style="dim")
                heading.append(f"{value}    ", style="bold")
            lines.append(heading)
            parts = split_parts(gpu, split) if number == 0 and split else []
            if parts:
                drawn = [(v or 0.0, SPLIT_STYLES[label]) for label, v in parts]
            else:
                drawn = [(gpu.memory_used or 0.0, USED_STYLE)]
            lines.append(Text("VRAM ", style="dim") + bar(drawn, gpu.memory_total, width - 5))
            if parts:
                free = None
                if gpu.memory_total is not None and gpu.memory_used is not None:
                    free = max(gpu.memory_total - gpu.memory_used, 0.0)
                entries = [(label, v, SPLIT_STYLES[label]) for label, v in parts]
                lines.append(legend([*entries, ("free", free, FREE_STYLE)]))
        return lines

    def _cpu(self, host: Host, width: int) -> list[Text]:
        heading = Text()
        heading.append("CPU only", style="bold")
        heading.append(": no GPU in use    ", style="dim")
        cpus = f" of {host.cpus} cores" if host.cpus else ""
        heading.append("CPU ", style="dim")
        heading.append(f"{fmt.pct(host.cpu_pct)}{cpus}    ", style="bold")
        heading.append("host memory ", style="dim")
        heading.append(f"{fmt.size(host.memory_used)} / {fmt.size(host.memory_total)}", style="bold")
        memory = Text("RAM  ", style="dim") + bar(
            [(host.memory_used or 0.0, USED_STYLE)], host.memory_total, width - 5
        )
        free = None
        if host.memory_total is not None and host.memory_used is not None:
            free = max(host.memory_total - host.memory_used, 0.0)
        return [heading, memory, legend([("used", host.memory_used, USED_STYLE), ("free", free, FREE_STYLE)])]

    @staticmethod
    def _engine(status: Status) -> Text:
        line = Text("engine ", style="dim")
        stats = status.engine_stats
        if stats is None:
            line.append(f"{fmt.NA} (not ready)" if status.ready is False else fmt.NA)
            return line
        tiers = " / ".join(f"{fmt.text(status.adapters.get(t))} {t}" for t in ("gpu", "cpu", "disk"))
        line.append(_engine_summary(stats))
        line.append("   adapters ", style="dim")
        line.append(tiers)
        return line


def _engine_summary(stats: EngineStats) -> str:
    kv = fmt.pct(stats.kv_cache_usage * 100 if stats.kv_cache_usage is not None else None)
    pinned = (
        fmt.NA if stats.pinned is None else ", ".join(p.partition("#")[0] for p in stats.pinned) or "none"
    )
    return (
        f"{fmt.text(stats.running)} running · {fmt.text(stats.waiting)} waiting · KV cache {kv} used · "
        f"{fmt.text(stats.gpu_slots)} adapter slots · pinned: {pinned}"
    )
