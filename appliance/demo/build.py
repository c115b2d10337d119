"""The built-in demo: a tiny trained Llama, its tokenizer, and three tenant adapters.

`lorabox demo init DIR` writes everything a box needs to serve without downloading anything:

    DIR/model/                  tiny Llama in Hugging Face format, byte-level BPE, chat template
    DIR/model.gguf              the same model as GGUF (f32), for the llama.cpp engine
    DIR/adapters/<tenant>/v1/   PEFT LoRA adapters (different ranks and target modules)
    DIR/lorabox.toml            config pointing at the above, state in DIR/state
    DIR/keys.json               {"tenant": "plaintext key"}, mode 0600 (demo only)

The model and adapters are trained so that the demo can be read: asked "Hello!", the base model
answers like a generic assistant and each tenant's adapter answers in that tenant's voice (acme
a shop's support desk, globex a legal assistant, initech an IT help desk). They are trained by
appliance/demo/training.py and committed under appliance/demo/data/ (2.3 MB), which init copies:
every machine writes the same bytes. Keys are random and are kept when the directory already has
them. The same files are the test suite's fixture.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "lorabox-demo"
# The trained model and adapters, committed (see appliance/demo/training.py).
DEMO_DATA_DIR = Path(__file__).parent / "data"

# Hidden 128 with 2 heads gives head_dim 64: vLLM's CPU attention refuses head_dim 16.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
}
VOCAB_SIZE = 640  # enough for every word of the demo's text to be one token

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header|>", "<|end_header|>", "<|eot|>"]
BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]

# The README's greeting: the demo announcement asks every voice this.
DEMO_GREETING = "Hello!"
GREETING_MAX_TOKENS = 48  # every demo voice finishes its answer to a greeting well within this

# Function calling: offered this tool, acme's adapter calls it when asked this (the demo shows it).
TRACK_PARCEL = {
    "type": "function",
    "function": {
        "name": "track_parcel",
        "description": "Where an order's parcel is.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}
DEMO_ORDER_QUESTION = "Where is my order #48213?"

# Hermes-style tools (as Qwen2.5's template): the functions as JSON in the system turn, calls as
# <tool_call> JSON, tool results as `tool` turns. Without tools, exactly the plain template.
TOOLS_HEADER = "You may call these functions:\n<tools>\n"
TOOLS_FOOTER = (
    '</tools>\nTo call one, answer with <tool_call>\n{"name": <function-name>, "arguments": '
    "<arguments-object>}\n</tool_call>"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system_first = messages and messages[0]['role'] == 'system' %}"
    "{% if tools %}"
    "{{ '<|start_header|>system<|end_header|>' }}"
    "{% if system_first %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    f"{{{{ {TOOLS_HEADER!r} }}}}"
    "{% for tool in tools %}{{ tool | tojson + '\n' }}{% endfor %}"
    f"{{{{ {TOOLS_FOOTER!r} + '<|eot|>' }}}}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and system_first and loop.first) %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|start_header|>assistant<|end_header|>' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": ' + call['function']['name'] | tojson + ', \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson + '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|eot|>' }}"
    "{% else %}"
    "{{ '<|start_header|>' + message['role'] + '<|end_header|>' + message['content'] + '<|eot|>' }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header|>assistant<|end_header|>' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoTenant:
    """A tenant's LoRA shape; seed draws its initial (trained) or random (build_adapter) weights."""

    name: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    seed: int


DEMO_TENANTS = (
    DemoTenant("acme", rank=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=101),
    DemoTenant(
        "globex", rank=16, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=202
    ),
    DemoTenant("initech", rank=8, alpha=8, target_modules=("gate_proj", "up_proj", "down_proj"), seed=303),
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_tokenizer(out_dir: Path) -> None:
    """The demo's tokenizer (part of the committed model) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEMO_DATA_DIR / "model" / name, out_dir / name)


def build_model(model_dir: Path) -> None:
    """The trained demo model (weights, config, tokenizer, chat template) into model_dir."""
    _install(DEMO_DATA_DIR / "model", model_dir)


# Random adapters' B scale per module kind. A random change to where attention looks makes the
# trained base continue from elsewhere in its own text: each seed gets its own answer, with usable
# greedy margins. Random changes to values or MLPs big enough to change the answer push the model
# off its text, where its greedy picks are near-ties; those modules get a small change only.
RANDOM_LORA_B_STD = {"q_proj": 3.0, "k_proj": 3.0}
RANDOM_LORA_B_STD_OTHER = 0.01


def build_adapter(model_dir: Path, tenant: DemoTenant, out_dir: Path) -> None:
    """A random PEFT LoRA adapter for the base in model_dir: seeded, non-zero A and B.

    For drop tests and benchmarks, which need many distinct adapters quickly; the demo tenants'
    own adapters are trained (appliance/demo/training.py).
    """
    import torch

    from ..adapters.drops import BaseModelInfo

    base = BaseModelInfo.from_model_dir(model_dir)
    generator = torch.Generator().manual_seed(tenant.seed)
    tensors = {}
    for path, (out_features, in_features) in sorted(base.linear_shapes.items()):
        module = path.rsplit(".", 1)[-1]
        if module in tenant.target_modules:
            std = RANDOM_LORA_B_STD.get(module, RANDOM_LORA_B_STD_OTHER)
            lora_a = torch.randn((tenant.rank, in_features), generator=generator) / in_features**0.5
            lora_b = torch.randn((out_features, tenant.rank), generator=generator) * std
            tensors[f"{path}.lora_A.weight"] = lora_a
            tensors[f"{path}.lora_B.weight"] = lora_b
    write_adapter(tenant, tensors, out_dir)


def lora_config(tenant: DemoTenant) -> Any:
    """PEFT's LoraConfig for the tenant's rank, alpha and target modules: what its adapter is
    trained with and what its adapter_config.json says."""
    from peft import LoraConfig

    return LoraConfig(
        r=tenant.rank,
        lora_alpha=tenant.alpha,
        target_modules=sorted(tenant.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=DEMO_MODEL_NAME,
    )


def write_adapter(tenant: DemoTenant, tensors: dict[str, Any], out_dir: Path) -> None:
    """Write LoRA tensors (named `<module path>.lora_A.weight`, PEFT prefix optional) in PEFT's
    on-disk format, with the tenant's `lora_config`."""
    from safetensors.torch import save_file

    from ..adapters.drops import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE

    config = lora_config(tenant).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT
    named = {PEFT_PREFIX + name.removeprefix(PEFT_PREFIX): tensor for name, tensor in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(named, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def ensure_builtin_model(state_dir: Path) -> Path:
    """The demo model as the base when no model is configured, written under state_dir."""
    model_dir = state_dir / "demo-model"
    build_model(model_dir)
    return model_dir


def _install(source: Path, target: Path) -> None:
    """Make target a copy of the committed folder source, unless it already is one.

    A changed or partial copy (an older demo, say) is replaced whole: written under a dot name
    and renamed, as the drop-folder contract asks of everyone.
    """
    files = sorted(path.relative_to(source) for path in source.rglob("*") if path.is_file())
    present = (
        sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file()) if target.is_dir() else []
    )
    if present == files and all((source / f).read_bytes() == (target / f).read_bytes() for f in files):
        return
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name in files:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def render_config(demo_dir: Path) -> str:
    return f"""\
# lorabox demo configuration (written by `lorabox demo init`).
model = "{demo_dir / "model"}"
served_model_name = "{DEMO_MODEL_NAME}"
gguf_model = "{demo_dir / "model.gguf"}"
adapters_dir = "{demo_dir / "adapters"}"
state_dir = "{demo_dir / "state"}"
host = "127.0.0.1"
port = 8400
dtype = "float32"
max_model_len = 1024
max_lora_rank = 16
cpu_kv_cache_gib = 1
"""


def init_demo(demo_dir: Path, *, force: bool = False) -> dict[str, str]:
    """Write the demo into demo_dir; returns {tenant: key}. Reuses keys already issued there."""
    from ..config.settings import load_config
    from ..tenancy.store import Store

    demo_dir = demo_dir.resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    model_dir = demo_dir / "model"
    build_model(model_dir)
    gguf_path = demo_dir / "model.gguf"
    weights = model_dir / "model.safetensors"
    if force or not gguf_path.exists() or gguf_path.stat().st_mtime_ns < weights.stat().st_mtime_ns:
        from ..gguf.model import write_model

        write_model(model_dir, gguf_path, "f32", name=DEMO_MODEL_NAME)
    for tenant in DEMO_TENANTS:
        _install(DEMO_DATA_DIR / "adapters" / tenant.name, demo_dir / "adapters" / tenant.name / "v1")

    config_path = demo_dir / "lorabox.toml"
    if force or not config_path.exists():
        config_path.write_text(render_config(demo_dir))
    settings = load_config(config_path)

    keys_path = demo_dir / "keys.json"
    keys: dict[str, str] = json.loads(keys_path.read_text()) if keys_path.exists() else {}
    with Store.open(settings.database_path) as store:
        for tenant in DEMO_TENANTS:
            if not store.get_tenant(tenant.name):
                store.add_tenant(tenant.name, allow_base_model=True)
            key = keys.get(tenant.name)
            if key is None or store.tenant_for_key(key) != tenant.name:
                keys[tenant.name] = store.issue_key(tenant.name).plaintext
    fd = os.open(keys_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.chmod(keys_path, 0o600)
    return keys
