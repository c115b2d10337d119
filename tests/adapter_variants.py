"""PEFT adapters as training tools write them, built with PEFT itself on the demo base.

Each variant is what a PEFT, Unsloth, Axolotl or LLaMA-Factory user gets from a setting: a
`LoraConfig`, `get_peft_model`, weights set as training would leave them (random, seeded, never
zero) and `save_pretrained`, with the options that setting implies (a conversion on save, a dtype,
`save_embedding_layers`). The table says what lorabox must do with each on each engine: serve it
exactly as HF transformers + PEFT computes it, or refuse it with a reason naming the option.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ENGINES = ("vllm", "llamacpp")
# EVA's data: each batch needs more tokens than its SVD has components (r * rho), or it never converges.
EVA_TEXT = [
    "Hello, how can I help you with your order today?",
    "Support tickets and invoices are answered by the desk within a day.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Every tenant gets answers shaped by its own adapter on this box.",
]

# lora_B's spread per module kind: a change to where attention looks makes the trained demo base
# continue from elsewhere in its own text, with clear greedy margins; changes to values, MLPs and
# the output layer push it off its text, where its picks are near-ties, so they stay small there.
B_STD = {"q_proj": 3.0, "k_proj": 3.0, "lm_head": 0.05}
B_STD_OTHER = 0.01


@dataclass(frozen=True)
class Variant:
    name: str
    """The version folder it is dropped as."""
    build: Callable[[Path, Path], None]
    """(base model folder, output folder) → the adapter, as the tool writes it."""
    refused: dict[str, str] = field(default_factory=dict)
    """Engine → what its refusal must say (the option and the way out); engines absent serve it."""
    converted_from: str = ""
    """For a GGUF LoRA: the variant whose PEFT adapter it was converted from (the reference's)."""

    def served_on(self, engine: str) -> bool:
        return engine not in self.refused


def _base(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _train(peft_model: Any, seed: int) -> None:
    """Weights as training leaves them: every LoRA parameter drawn anew, seeded, B never zero."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_" not in name:
                continue
            module = name.split(".lora_")[0].rsplit(".", 1)[-1]
            noise = torch.randn(param.shape, generator=generator)
            if ".lora_A." in name or "lora_embedding_A" in name:
                param.copy_(noise / param.shape[-1] ** 0.5)
            elif "magnitude" in name:
                param.mul_(1 + noise)
            else:  # lora_B (and its bias)
                param.copy_(noise * B_STD.get(module, B_STD_OTHER))


def peft_adapter(
    *,
    seed: int,
    dtype: str | None = None,
    save: dict[str, Any] | None = None,
    prepare: Callable[[Any], None] | None = None,
    **config: Any,
) -> Callable[[Path, Path], None]:
    """A builder: LoraConfig(**config) on the base, trained weights, save_pretrained(**save)."""

    def build(model_dir: Path, out: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        base = _base(model_dir)
        if prepare is not None:
            prepare(base)
        settings = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]} | config
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))
        _train(model, seed)
        if dtype is not None:
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.data = param.data.to(getattr(torch, dtype))
        model.save_pretrained(out, **(save or {}))

    return build


def _base_changing(model_dir: Path, config: dict[str, Any]) -> Any:
    """The PEFT model of a base-changing init (PiSSA, OLoRA, CorDA), its base weights changed."""
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]} | config
    lora = LoraConfig(task_type="CAUSAL_LM", **settings)
    base = _base(model_dir)
    if settings.get("init_lora_weights") == "corda":  # CorDA decomposes by the inputs' covariance
        from peft.tuners.lora.corda import preprocess_corda
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        samples = [tokenizer([text], return_tensors="pt") for text in EVA_TEXT]  # one at a time
        preprocess_corda(base, lora, run_model=lambda: [base(**sample) for sample in samples])
    return get_peft_model(base, lora)


def converted(*, seed: int, **config: Any) -> Callable[[Path, Path], None]:
    """A base-changing init (PiSSA, OLoRA, CorDA) saved with PEFT's conversion to a plain LoRA."""

    def build(model_dir: Path, out: Path) -> None:
        model = _base_changing(model_dir, config)
        with tempfile.TemporaryDirectory() as scratch:
            initial = Path(scratch) / "initial"  # its name becomes an adapter name: no dots
            model.peft_config["default"].init_lora_weights = True  # as PEFT's documentation says
            model.save_pretrained(initial)
            _nudge(model, seed)
            model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))

    return build


def _nudge(peft_model: Any, seed: int) -> None:
    """Training after a base-changing init: the SVD-made A and B move a little."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * param.abs().mean() * 3)


def unconverted(*, seed: int, **config: Any) -> Callable[[Path, Path], None]:
    """A base-changing init saved as is, without the conversion (a LLaMA-Factory default)."""

    def build(model_dir: Path, out: Path) -> None:
        model = _base_changing(model_dir, config)
        _nudge(model, seed)
        model.save_pretrained(out)

    return build


def eva(*, seed: int, **config: Any) -> Callable[[Path, Path], None]:
    """EVA: A from the SVD of the layers' inputs on data, ranks redistributed (rank_pattern)."""

    def build(model_dir: Path, out: Path) -> None:
        from peft import EvaConfig, LoraConfig, get_peft_model
        from peft.tuners.lora.eva import initialize_lora_eva_weights
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batches = [dict(tokenizer(EVA_TEXT, return_tensors="pt", padding=True))] * 4
        settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]} | config
        lora = LoraConfig(
            task_type="CAUSAL_LM", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0), **settings
        )
        model = get_peft_model(_base(model_dir), lora)
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
        _train_b(model, seed)
        model.save_pretrained(out)

    return build


def _train_b(peft_model: Any, seed: int) -> None:
    """Training after EVA, which sets A and leaves B zero: B drawn as training would leave it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_B." in name:
                module = name.split(".lora_B")[0].rsplit(".", 1)[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * B_STD.get(module, B_STD_OTHER))


def edited(build: Callable[[Path, Path], None], **changes: Any) -> Callable[[Path, Path], None]:
    """A tool's adapter whose config says more than PEFT's would (LoftQ without scipy here; a
    hand-written `all-linear`): built as `build`, then the config changed."""

    def edit(model_dir: Path, out: Path) -> None:
        build(model_dir, out)
        path = out / CONFIG
        path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))

    return edit


def gguf_of(source: str) -> Callable[[Path, Path], None]:
    """The `source` variant converted to a GGUF LoRA, as llama.cpp's convert_lora_to_gguf.py
    writes one (lorabox's converter writes that format), dropped as adapter_model.gguf alone."""

    def build(model_dir: Path, out: Path) -> None:
        from appliance.gguf.adapterfile import GGUF_FILE
        from appliance.gguf.lora import BaseGGUF, cached_lora

        with tempfile.TemporaryDirectory() as cache:
            base = BaseGGUF.read(model_dir.parent / "model.gguf")  # the demo's, beside its model
            converted = cached_lora(out.parent / source, base, Path(cache))
            out.mkdir(parents=True)
            (out / GGUF_FILE).write_bytes(converted.read_bytes())

    return build


def _resize_vocabulary(base: Any) -> None:
    base.resize_token_embeddings(704)  # new tokens added to the tokenizer while training


CONVERSION = "path_initial_model_for_weight_conversion"

VARIANTS = [
    Variant("v01-plain", peft_adapter(seed=1)),
    Variant("v02-rslora", peft_adapter(seed=2, use_rslora=True, r=16, lora_alpha=8)),
    Variant(
        "v03-seven-linear",
        peft_adapter(  # seed 3 left a greedy margin of 0.007 on the retrained demo model (103: 0.33)
            seed=103,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ),
    # PEFT writes the matched modules' full paths for a small model.
    Variant("v04-all-linear", peft_adapter(seed=4, r=4, lora_alpha=8, target_modules="all-linear")),
    Variant(
        "v05-all-linear-as-written",
        edited(
            peft_adapter(seed=5, r=4, lora_alpha=8, target_modules="all-linear"), target_modules="all-linear"
        ),
    ),
    Variant(
        "v06-full-paths",
        peft_adapter(
            seed=6, target_modules=["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
        ),
    ),
    Variant("v07-regex", peft_adapter(seed=7, target_modules=r".*\.layers\.\d+\.self_attn\.(q_proj|k_proj)")),
    Variant("v08-dropout", peft_adapter(seed=8, lora_dropout=0.1)),
    Variant("v09-fp16", peft_adapter(seed=9, dtype="float16")),
    Variant("v10-bf16", peft_adapter(seed=110, dtype="bfloat16")),
    Variant(
        "v11-layers-to-transform",
        peft_adapter(seed=11, target_modules=["q_proj", "k_proj"], layers_to_transform=0),
    ),
    Variant(
        "v12-layers-pattern",
        peft_adapter(
            seed=12, target_modules=["q_proj", "k_proj"], layers_to_transform=[0], layers_pattern="layers"
        ),
    ),
    Variant(
        "v13-exclude-modules",
        peft_adapter(
            seed=13, target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]
        ),
    ),
    Variant(
        "v14-lm-head",
        peft_adapter(seed=14, target_modules=["q_proj", "lm_head"], save={"save_embedding_layers": False}),
    ),
    Variant(
        "v15-rank-pattern",
        peft_adapter(
            seed=15,
            target_modules=["q_proj", "k_proj", "v_proj"],
            rank_pattern={"k_proj": 4, "model.layers.1.self_attn.q_proj": 16},
        ),
    ),
    Variant(
        "v16-alpha-pattern",
        peft_adapter(seed=16, target_modules=["q_proj", "k_proj"], alpha_pattern={"k_proj": 4}),
    ),
    Variant(
        "v17-patterns-rslora",
        peft_adapter(
            seed=17,
            target_modules=["q_proj", "k_proj"],
            use_rslora=True,
            rank_pattern={"q_proj": 4},
            alpha_pattern={"model.layers.0.self_attn.k_proj": 32},
        ),
    ),
    Variant("v18-gaussian-init", peft_adapter(seed=18, init_lora_weights="gaussian")),
    Variant("v19-pissa-converted", converted(seed=19, init_lora_weights="pissa")),
    Variant("v20-olora-converted", converted(seed=20, init_lora_weights="olora")),
    Variant("v21-eva", eva(seed=21)),
    Variant("v22-bias-all", peft_adapter(seed=22, bias="all"), refused={"vllm": 'set "bias": "none"'}),
    Variant(
        "v23-dora",
        peft_adapter(seed=5, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        refused=dict.fromkeys(ENGINES, "use_dora=false"),
    ),
    Variant(
        "v24-modules-to-save",
        peft_adapter(seed=24, modules_to_save=["lm_head"]),
        refused=dict.fromkeys(ENGINES, "modules_to_save"),
    ),
    Variant(
        "v25-pissa-unconverted",
        unconverted(seed=25, init_lora_weights="pissa"),
        refused=dict.fromkeys(ENGINES, CONVERSION),
    ),
    Variant(
        "v26-olora-unconverted",
        unconverted(seed=26, init_lora_weights="olora"),
        refused=dict.fromkeys(ENGINES, CONVERSION),
    ),
    Variant(
        "v27-loftq",
        edited(
            peft_adapter(seed=27), init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}
        ),
        refused=dict.fromkeys(ENGINES, "init_lora_weights='loftq'"),
    ),
    Variant(
        "v28-lora-bias",
        peft_adapter(seed=28, lora_bias=True),
        refused=dict.fromkeys(ENGINES, "lora_bias=false"),
    ),
    Variant(
        "v29-save-embedding-layers",
        peft_adapter(seed=29, save={"save_embedding_layers": True}),
        refused=dict.fromkeys(ENGINES, "save_embedding_layers=False"),
    ),
    Variant(
        "v30-lm-head-default-save",
        peft_adapter(seed=30, target_modules=["q_proj", "lm_head"]),
        refused=dict.fromkeys(ENGINES, "save_embedding_layers=False"),
    ),
    Variant(
        "v31-embed-tokens",
        peft_adapter(
            seed=31, target_modules=["q_proj", "embed_tokens"], save={"save_embedding_layers": False}
        ),
        refused={"llamacpp": "train without embed_tokens"},
    ),
    Variant(
        "v32-resized-vocabulary",
        peft_adapter(seed=32, prepare=_resize_vocabulary),
        refused=dict.fromkeys(ENGINES, "vocabulary was resized"),
    ),
    Variant(
        "v33-corda-unconverted",
        unconverted(seed=33, init_lora_weights="corda"),
        refused=dict.fromkeys(ENGINES, CONVERSION),
    ),
    Variant("v34-corda-converted", converted(seed=34, init_lora_weights="corda")),
    Variant(
        "v35-gguf-lora",
        gguf_of("v15-rank-pattern"),
        refused={"vllm": "drop the PEFT adapter it was converted from"},
        converted_from="v15-rank-pattern",
    ),
]


def build_all(model_dir: Path, out: Path) -> dict[str, Path]:
    """Every variant into out/<name>; returns name → folder."""
    import warnings

    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the very settings built here
        for variant in VARIANTS:
            folder = out / variant.name
            variant.build(model_dir, folder)
            folders[variant.name] = folder
    return folders
