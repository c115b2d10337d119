"""Where adapters live (GPU slot, host memory, disk): the engine sizing plan and the residency report.

vLLM pre-allocates `max_loras` GPU slots at engine start, each holding an adapter of rank up to
`max_lora_rank` on every LoRA-capable linear layer; adapters beyond the slots wait in a host-memory
LRU cache of `max_cpu_loras` entries, and adapters beyond that are read from disk when a request
needs them. Both sizes are fixed for the engine's lifetime, so `plan` picks them from the adapter
count and a memory budget, and says why in one line.

The report is lorabox's model of vLLM's two LRU caches, not a readout: vLLM does not expose which
adapter sits in which slot. It stays consistent by construction, because `ResidencyTracker` replays
the events lorabox itself causes (add_lora, requests, remove_lora, pin_lora, unpin) through the same rules
as vLLM 0.32's LRUCacheLoRAModelManager: adding or using an adapter makes it the most recent entry
of both caches (add_lora also activates it in a slot), a full cache evicts its least recently used
unpinned entry, leaving host memory also frees the slot (which stays empty until an adapter is next
added or used), and a pinned adapter keeps its slot and its place in host memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .drops import BaseModelInfo
from .safetensors_header import read_header


def slot_bytes(base: BaseModelInfo, max_rank: int, dtype_bytes: int) -> int:
    """Bytes of one GPU slot: A (rank x in) and B (out x rank) for every linear layer but lm_head."""
    elements = sum(
        max_rank * (in_features + out_features)
        for path, (out_features, in_features) in base.linear_shapes.items()
        if path.rsplit(".", 1)[-1] != "lm_head"  # vLLM puts no LoRA on lm_head by default
    )
    return elements * dtype_bytes


def adapter_bytes_from_header(path: Path | str) -> int:
    """Bytes of an adapter's tensors, from its safetensors header (the weights are not read)."""
    return sum(info.nbytes for info in read_header(Path(path)).values())


def lora_budget_bytes(*, gpu_free_bytes: int | None, cpu_budget_bytes: int, fraction: float = 0.5) -> int:
    """Memory for LoRA slots: `fraction` of the VRAM still free after the base model and KV cache,
    or, on a CPU-only box (gpu_free_bytes None), the configured budget."""
    if gpu_free_bytes is None:
        return max(0, cpu_budget_bytes)
    return int(max(0, gpu_free_bytes) * fraction)


@dataclass(frozen=True)
class Plan:
    max_loras: int
    max_cpu_loras: int
    slot_bytes: int
    lora_budget_bytes: int
    reason: str


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def plan(
    *,
    adapters: int,
    pinned: int,
    base: BaseModelInfo,
    max_rank: int,
    dtype_bytes: int,
    lora_budget_bytes: int,
    configured_max_loras: int | None,
    configured_max_cpu_loras: int | None,
    floor_loras: int = 1,
    cap_loras: int = 256,
) -> Plan:
    """Engine sizes for `adapters` registered adapters, `pinned` of which must keep a GPU slot."""
    slot = slot_bytes(base, max_rank, dtype_bytes)
    fits = lora_budget_bytes // slot if slot else cap_loras
    head = f"{adapters} adapters ({pinned} pinned), slot {_size(slot)}, budget {_size(lora_budget_bytes)}"
    if configured_max_loras is not None:
        max_loras, notes = configured_max_loras, ["configured"]
    else:
        if configured_max_cpu_loras is not None:  # a slot's adapter is also in host memory
            cap_loras = min(cap_loras, configured_max_cpu_loras)
        wanted = min(cap_loras, max(floor_loras, adapters))
        # Pinned adapters hold their slots for good; one more stays unpinned, for everything else
        # (other tenants, canaries, newly dropped tenants), so pinning can never stall them.
        required = min(cap_loras, max(floor_loras, pinned + 1))
        max_loras = max(required, min(wanted, fits))
        notes = [f"budget fits {fits} of {wanted} wanted"] if fits < wanted else []
    if max_loras > fits:
        notes.append(f"{max_loras} slots need {_size(max_loras * slot)}, over the budget")
    cpu = configured_max_cpu_loras
    if cpu is None:
        cpu = max(adapters + 16, 2 * max_loras)  # headroom for versions dropped after start
    cpu_note = ""
    if cpu < max_loras:  # vLLM requires max_cpu_loras >= max_loras
        cpu, cpu_note = max_loras, " (raised to max_loras)"
    plural, detail = "s" * (max_loras != 1), f" ({', '.join(notes)})" if notes else ""
    reason = f"{head} → {max_loras} GPU slot{plural}{detail}, {cpu} in host memory{cpu_note}"
    return Plan(max_loras, cpu, slot, lora_budget_bytes, reason)


@dataclass(frozen=True)
class Residency:
    name: str
    tier: str  # "gpu" | "cpu" | "disk"
    pinned: bool
    last_used: float | None


class ResidencyTracker:
    """Replays what lorabox asked of the engine through vLLM's LRU rules (see the module docstring)."""

    def __init__(self, max_loras: int, max_cpu_loras: int) -> None:
        if max_loras < 1 or max_cpu_loras < max_loras:
            raise ValueError("need max_loras >= 1 and max_cpu_loras >= max_loras")
        self.max_loras, self.max_cpu_loras = max_loras, max_cpu_loras
        self._host: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recent first
        self._slots: OrderedDict[str, None] = OrderedDict()  # the subset in GPU slots, same order
        self._pinned: set[str] = set()
        self._last_used: dict[str, float] = {}

    def loaded(self, name: str) -> None:
        """add_lora: the adapter is in host memory and, as vLLM activates it too, in a GPU slot."""
        evicted = self._touch(self._host, self.max_cpu_loras, name)
        if evicted is not None:
            self._slots.pop(evicted, None)
        self._touch(self._slots, self.max_loras, name)

    def used(self, name: str, now: float) -> None:
        """A request ran with the adapter: vLLM loaded it if needed and it holds a GPU slot now."""
        self.loaded(name)
        self._last_used[name] = now

    def unloaded(self, name: str) -> None:
        """remove_lora: gone from host memory and its slot; removing also drops a pin, as in vLLM."""
        self._host.pop(name, None)
        self._slots.pop(name, None)
        self._pinned.discard(name)

    def pin(self, name: str) -> None:
        """pin_lora: the adapter (loaded first if need be) keeps its GPU slot until unpinned or removed."""
        self.loaded(name)
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        """The adapter becomes an ordinary LRU entry again.

        vLLM 0.32 has no unpin call: the engine removes the adapter and adds it back, which makes it
        the most recent entry of both caches."""
        self._pinned.discard(name)
        self.loaded(name)

    def _touch(self, cache: OrderedDict[str, None], capacity: int, name: str) -> str | None:
        """Make `name` the most recent entry; a full cache first evicts its oldest unpinned entry.

        A cache whose entries are all pinned takes nothing in: the engine's slot gate holds other
        adapters back while every slot is pinned (a moment, during a pinned tenant's switch)."""
        evicted = None
        if name not in cache and len(cache) >= capacity:
            evicted = next((entry for entry in cache if entry not in self._pinned), None)
            if evicted is None:
                return None
            del cache[evicted]
        cache[name] = None
        cache.move_to_end(name)
        return evicted

    def report(self, known_names: Iterable[str]) -> list[Residency]:
        """One entry per known adapter name, in the given order (duplicates once)."""
        return [
            Residency(
                name=name,
                tier="gpu" if name in self._slots else "cpu" if name in self._host else "disk",
                pinned=name in self._pinned,
                last_used=self._last_used.get(name),
            )
            for name in dict.fromkeys(known_names)
        ]
