"""An adapter_config.json read the way PEFT reads it, against the served base model's modules.

PEFT decides which modules an adapter adapts and with which rank and scale: its own `LoraConfig`
parses the file (full module paths, suffixes, a regex string, `layers_to_transform`,
`layers_pattern`, `exclude_modules`, `rank_pattern`, `alpha_pattern`, `use_rslora`), and its own
`check_target_module_exists` and `get_pattern_key` match every module of the base, as
`PeftModel.from_pretrained` does. Only `all-linear` is expanded here, by PEFT's rule (every linear
layer but the output layer), since PEFT expands it from a live model.

Those helpers match with `re`, whose engine holds the interpreter while it backtracks: one
pattern in a dropped config could stall the daemon for hours. So PEFT's own functions run here
with `re` bound to the `regex` module, which matches the same patterns (its default mode is
`re`'s syntax), gives the interpreter up while it matches, and stops at a deadline.

What no engine can serve exactly is refused here, naming the option and the way out: inits that
change the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), DoRA, full module copies, LoRA
biases and the other LoRA variants. What one engine serves and another does not is declared by
each engine (`AdapterSupport`, engines/base.py) and checked in drops.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import regex

from ..errors import AdapterError

CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"
# The model's output layer, which PEFT leaves out of `all-linear` (get_output_embeddings()).
OUTPUT_LAYER = "lm_head"
EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES
MATCH_BUDGET_S = 1.0
"""How long matching one config's patterns against the base's modules may take in all."""
MAX_PATTERN_CHARS = 1000

# Inits that change the base weights while training: PEFT's conversion on save turns the result
# into a plain LoRA of twice the rank.
CONVERT_ON_SAVE = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "lora_ga": "LoRA-GA",
}
CONVERSION = (
    "save it with PEFT's conversion, save_pretrained(dir, path_initial_model_for_weight_conversion="
    "<the adapter saved before training>), which makes it a plain LoRA"
)

# Who a refusal of what no engine serves names (one rule for every engine lorabox has).
NO_ENGINE = "neither vLLM nor llama.cpp"

# LoRA options no engine here serves: what each does, in a reason's words.
VARIANTS: dict[str, str] = {
    "alora_invocation_tokens": "Activated LoRA, applied only after its invocation tokens",
    "layer_replication": "stacked copies of base layers",
    "use_bdlora": "block-diagonal LoRA",
    "use_qalora": "QALoRA, applied to pooled inputs",
    "velora_config": "the VeLoRA variant",
    "kasa_config": "KaSA, with singular values between A and B",
    "arrow_config": "Arrow routing between adapters",
    "monteclora_config": "MonteCLoRA sampling",
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "trainable_token_indices": "trainable token embeddings",
}


@dataclass(frozen=True)
class AdaptedModule:
    """One module the adapter changes, as PEFT sets it up."""

    rank: int
    alpha: float
    scale: float
    """What PEFT multiplies B @ A by: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""


@dataclass(frozen=True)
class LoraReading:
    """What an adapter_config.json means for this base model."""

    rank: int  # the config's r
    alpha: float  # the config's lora_alpha
    use_rslora: bool
    bias: str  # PEFT's `bias` option: none | all | lora_only
    base_model: str  # base_model_name_or_path, "" when unnamed
    modules: dict[str, AdaptedModule]  # linear module path (model.layers.0.self_attn.q_proj) → setup
    embeddings: dict[str, AdaptedModule]  # embedding modules it adapts (a LoRA on embed_tokens)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in (*self.modules.values(), *self.embeddings.values()))


class BaseModules(Protocol):
    """The base model's modules, as PEFT would see them in `model.named_modules()`."""

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path → (out_features, in_features)."""

    @property
    def embeddings(self) -> dict[str, tuple[int, int]]:
        """Embedding path → (vocabulary, hidden)."""

    @property
    def modules(self) -> frozenset[str]:
        """Every module path, parents included."""


def import_peft() -> None:
    """Import PEFT now, while the daemon is built: the registry thread reads configs with it, and
    an import on a thread holds the import machinery, stalling the event loop's next import."""
    import peft.tuners.tuners_utils
    import peft.utils.other  # noqa: F401


def read(config: dict[str, Any], base: BaseModules, max_rank: int) -> LoraReading:
    """Interpret a parsed adapter_config.json; raises AdapterError naming what cannot be served."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type must be LORA, not {short(config.get('peft_type'))}")
    rank = _rank(config.get("r"), "rank r")
    alpha = _alpha(config.get("lora_alpha", rank), "lora_alpha")
    _refuse_variants(config)
    peft = _peft_config(expand_all_linear(config, base))
    matching = _Matching(peft)
    modules: dict[str, AdaptedModule] = {}
    embeddings: dict[str, AdaptedModule] = {}
    for key in sorted(base.modules):
        if not matching.targets(key):
            continue
        if key not in base.linear_shapes and key not in base.embeddings:
            raise AdapterError(
                f"target_modules {short(config.get('target_modules'))} selects {key}, which is not a "
                "linear layer; PEFT cannot adapt it either"
            )
        module_rank = _rank(matching.pattern_value(peft.rank_pattern, key, rank), f"rank_pattern for {key}")
        if module_rank > max_rank:
            raise AdapterError(
                f"rank {module_rank} of {key} exceeds the engine's max_lora_rank {max_rank}; raise "
                "max_lora_rank in the config or train a smaller rank"
            )
        module_alpha = _alpha(
            matching.pattern_value(peft.alpha_pattern, key, alpha), f"alpha_pattern for {key}"
        )
        scale = module_alpha / (math.sqrt(module_rank) if peft.use_rslora else module_rank)
        adapted = embeddings if key in base.embeddings else modules
        adapted[key] = AdaptedModule(module_rank, float(module_alpha), scale)
    if not modules and not embeddings:
        layers = config.get("layers_to_transform")
        also = f" with layers_to_transform {short(layers)}" if layers is not None else ""
        raise AdapterError(
            f"target_modules {short(config.get('target_modules'))}{also} selects no module of the base model"
        )
    base_model = config.get("base_model_name_or_path")
    return LoraReading(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(peft.use_rslora),
        bias=str(peft.bias),
        base_model=base_model if isinstance(base_model, str) else "",
        modules=modules,
        embeddings=embeddings,
    )


def short(value: object) -> str:
    """A config value in a reason: the reason is stored and shown, the value may be a megabyte."""
    text = repr(value)
    return text if len(text) <= 160 else text[:160] + "…"


def _rank(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{what} must be a positive integer, not {short(value)}")
    return value


def _alpha(value: object, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterError(f"{what} must be a finite number, not {short(value)}")
    return float(value)


def _refuse_variants(config: dict[str, Any]) -> None:
    """Refuse, from the file's own values, what no engine here serves exactly: before PEFT parses
    it, so that the reason names the option (PEFT may refuse some of these itself, less clearly)."""
    if config.get("use_dora"):
        raise AdapterError(
            f"use_dora=true (DoRA) rescales each adapted weight by a learned magnitude, which {NO_ENGINE} "
            "applies to a LoRA; train with use_dora=false, or merge the adapter into the base model "
            "(merge_and_unload) and serve that"
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"modules_to_save={short(config['modules_to_save'])} ships full trained copies of those "
            f"modules, which {NO_ENGINE} loads per tenant; train without modules_to_save, or merge the "
            "adapter into the base model and serve that"
        )
    if config.get("lora_bias"):
        raise AdapterError(
            f"lora_bias=true trains a bias on every lora_B, which {NO_ENGINE} serves; train with "
            "lora_bias=false"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        method = next(
            (name for prefix, name in CONVERT_ON_SAVE.items() if init.lower().startswith(prefix)), None
        )
        if method is not None:
            raise AdapterError(
                f"init_lora_weights={init!r} ({method}) trained against base weights it changed, which "
                f"{NO_ENGINE} serves; {CONVERSION}"
            )
        if init.lower() == "loftq":
            raise AdapterError(
                f"init_lora_weights='loftq' trained against LoftQ's quantised base weights, which "
                f"{NO_ENGINE} serves; serve the base model LoftQ saved (with init_lora_weights=true in the "
                "adapter), or train with init_lora_weights=true"
            )
    for option, what in VARIANTS.items():
        if config.get(option):
            raise AdapterError(
                f"{option}={short(config[option])} ({what}) is served by {NO_ENGINE}; train a plain "
                f"LoRA without {option}"
            )
    known = {f.name for f in dataclasses.fields(_lora_config_class())}
    for option, value in config.items():
        # A newer PEFT's option that is set (true, or a non-empty setting) may change what the
        # adapter computes, and this PEFT cannot say how; unset ones are its defaults.
        if option not in known and option != "runtime_config" and (value is True or _non_empty(value)):
            raise AdapterError(
                f"{option}={short(value)} is an option the PEFT here ({_peft_version()}) does not know, so "
                "it cannot tell whether an engine serves it exactly; save the adapter without it"
            )


def _non_empty(value: object) -> bool:
    return isinstance(value, dict | list) and bool(value)


def _lora_config_class() -> Any:
    from peft import LoraConfig

    return LoraConfig


def _peft_version() -> str:
    import peft

    return f"peft {peft.__version__}"


def _peft_config(config: dict[str, Any]) -> Any:
    """PEFT's own LoraConfig for the file, as `PeftConfig.from_pretrained` builds it."""
    kwargs = {k: v for k, v in config.items() if k != "runtime_config"}
    try:
        peft = _lora_config_class().from_peft_type(**kwargs)
    except Exception as exc:  # PEFT raises TypeError, ValueError and more for what it cannot read
        raise AdapterError(
            f"{CONFIG_FILE}: PEFT cannot read it ({type(exc).__name__}: {short(str(exc))})"
        ) from exc
    if peft.target_modules is None:
        raise AdapterError("target_modules is missing: name the modules the adapter adapts")
    for option in ("target_modules", "exclude_modules"):
        value = getattr(peft, option)
        if isinstance(value, str):
            _check_pattern(value, option)
        elif value is not None and not all(isinstance(v, str) for v in value):
            raise AdapterError(f"{option} must be module names or one regular expression, not {short(value)}")
    for option in ("rank_pattern", "alpha_pattern"):
        if not isinstance(getattr(peft, option), dict):
            raise AdapterError(f"{option} must be an object of patterns, not {short(getattr(peft, option))}")
        for key in getattr(peft, option):
            _check_pattern(key, option)
    layers = peft.layers_pattern
    for pattern in [layers] if isinstance(layers, str) else layers or []:
        _check_pattern(pattern, "layers_pattern")
    return peft


def _check_pattern(pattern: object, option: str) -> None:
    if not isinstance(pattern, str):
        raise AdapterError(f"{option} holds {short(pattern)}, not a module name or regular expression")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(
            f"{option} holds a pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}"
        )
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as exc:
        raise AdapterError(
            f"{option} holds {short(pattern)}, not a valid regular expression ({exc})"
        ) from exc


class _BoundedRe:
    """The two functions of `re` PEFT's matching calls, on the `regex` module: the interpreter is
    free while a pattern matches, and all matching for one config stops at one deadline."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def _timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AdapterError(
                f"matching the config's patterns against the base model took over {MATCH_BUDGET_S:g} s; "
                "simplify its regular expressions"
            )
        return left

    def fullmatch(self, pattern: str, string: str) -> Any:
        return self._call(regex.fullmatch, pattern, string)

    def match(self, pattern: str, string: str) -> Any:
        return self._call(regex.match, pattern, string)

    def _call(self, fn: Callable[..., Any], pattern: str, string: str) -> Any:
        try:
            return fn(pattern, string, timeout=self._timeout(), concurrent=True)
        except TimeoutError:
            self.deadline = 0.0
            return self._timeout()  # raises, naming the budget
        except (regex.error, RecursionError, OverflowError) as exc:
            raise AdapterError(
                f"a pattern in {CONFIG_FILE} cannot be matched: {short(pattern)} ({exc})"
            ) from exc


def _rebound(fn: Any, **names: Any) -> Any:
    """PEFT's function `fn`, unchanged, with some of the global names it uses bound to others."""
    scope = dict(fn.__globals__) | names
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)


class _Matching:
    """PEFT's own module matching for one config (tuners_utils.check_target_module_exists, and
    utils.other.get_pattern_key for rank_pattern and alpha_pattern), on bounded regular expressions."""

    def __init__(self, peft: Any):
        from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
        from peft.utils.other import get_pattern_key, match_target_against_key

        bounded = _BoundedRe(MATCH_BUDGET_S)
        match_target = _rebound(match_target_against_key, re=bounded)
        self._check = _rebound(check_target_module_exists, re=bounded, match_target_against_key=match_target)
        self._pattern_key = _rebound(get_pattern_key, re=bounded)
        self._excluded = _ExcludedModule
        self.peft = peft

    def targets(self, key: str) -> bool:
        result = self._check(self.peft, key)
        return bool(result) and not isinstance(result, self._excluded)

    def pattern_value(self, pattern: dict[str, Any], key: str, default: Any) -> Any:
        return pattern.get(self._pattern_key(pattern.keys(), key), default) if pattern else default


def expand_all_linear(config: dict[str, Any], base: BaseModules) -> dict[str, Any]:
    """`target_modules = "all-linear"` as PEFT expands it: every linear layer but the output layer."""
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return config
    return config | {"target_modules": sorted(p for p in base.linear_shapes if p != OUTPUT_LAYER)}
