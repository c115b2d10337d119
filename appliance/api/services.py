"""What the request path needs, held by the API app (`SERVICES`): the store, the engine and what
wraps it, admission, the ledger, and who else learns of each request's outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from ..engines.base import Engine
from ..engines.health import EngineHealth
from ..serving.catalog import Catalog
from ..serving.generator import Generator
from ..serving.lifecycle import Lifecycle
from ..serving.structured import GrammarCompiler
from ..serving.tokenization import PromptEncoder, TextCodec
from ..serving.tools import Format
from ..telemetry.looplag import LoopLagMonitor
from ..tenancy.admission import Admission
from ..tenancy.ledger import RequestRecord, UsageLedger
from ..tenancy.store import Store
from ..tenancy.writer import StoreWriter
from .connections import ConnectionCounters

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What the request path needs. `generator` is None until the engine is ready."""

    store: Store
    """Reads only, on the event loop; writes go through `writer` (or the ledger)."""
    writer: StoreWriter
    catalog: Catalog
    codec: TextCodec
    ledger: UsageLedger
    engine: Engine
    health: EngineHealth
    admission: Admission
    """Policies, rate limits, quotas and the fair queue; telemetry reads its load() and views."""
    engine_name: str = ""
    engine_reason: str = ""  # why this engine serves (and, under `auto`, why not vLLM)
    engine_fallback: str = ""  # under `auto` with llama.cpp serving: why not vLLM, with the fix
    box_id: str = ""
    """This box's name in the usage ledger and the shared counters."""
    generator: Generator | None = None
    started_at: float = field(default_factory=time.time)
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    connections: ConnectionCounters = field(default_factory=ConnectionCounters)
    sinks: list[Callable[[RequestRecord], None]] = field(default_factory=list)
    """Besides the ledger, who learns of every request's outcome (telemetry)."""
    tool_format: Format | None = None
    """How the model writes tool calls (serving/tools); None: requests with tools are refused."""
    tool_format_reason: str = "tool calling is not set up"
    encoder: PromptEncoder = field(init=False)
    grammars: GrammarCompiler = field(init=False)

    def __post_init__(self) -> None:
        self.encoder = PromptEncoder(self.codec)
        self.grammars = GrammarCompiler(self.codec.llg_tokenizer)

    def publish(self, record: RequestRecord) -> asyncio.Future[None]:
        """One request's outcome: booked by the ledger (if admitted), counted by every sink. The
        future is done once the ledger has committed the row."""
        committed = self.ledger.book(record)
        self.count(record)
        return committed

    def count(self, record: RequestRecord) -> None:
        """Tell every sink (telemetry) of one request's outcome; the ledger is not one of them."""
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # a counting bug must not fail the request it counts
                log.exception("request record sink %r failed", sink)


SERVICES = web.AppKey("services", Services)
