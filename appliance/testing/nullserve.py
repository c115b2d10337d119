"""`lorabox serve` with the null engine (nullengine.py) behind it, for benchmarks and tests only:

    python -m appliance.testing.nullserve --config lorabox.toml [--tokens-per-delta 1] [--batch 1024]

Everything but the engine is the daemon `lorabox serve` runs (the same settings, tenants, adapters,
tokenizer, ledger); the engine emits the tokens of an ordinary English sentence in the base model's
tokenizer, so that detokenisation does its usual work. The log's engine line says it is the null
engine. The production CLI has no way to select it: this module is the only switch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..config.settings import load_config
from ..engines.base import EngineOptions
from ..engines.select import Selection
from ..ops.cli import _serve
from ..serving.tokenization import TextCodec
from .nullengine import NullEngine

TEXT = "The quick brown fox jumps over the lazy dog, and the support team answers every ticket. "


def null_selection(tokens_per_delta: int, batch: int) -> Callable[[str, EngineOptions], Selection]:
    def select(choice: str, options: EngineOptions) -> Selection:
        codec = TextCodec.from_model_dir(Path(options.model))
        token_ids = codec.tokenizer.encode(TEXT, add_special_tokens=False)
        engine = NullEngine(options, token_ids, tokens_per_delta=tokens_per_delta, batch=batch)
        return Selection(choice, options, engine, "the null engine (a test double: no model)")

    return select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--tokens-per-delta", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1024, help="the engine's max_batch")
    args = parser.parse_args()
    _serve(load_config(args.config), select=null_selection(args.tokens_per_delta, args.batch))


if __name__ == "__main__":
    main()
