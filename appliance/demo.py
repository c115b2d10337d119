"""The built-in demo: a deterministic tiny Llama, its tokenizer, and a few tenant adapters.

`lorabox demo init DIR` writes everything a box needs to serve without downloading anything:

    DIR/model/                  tiny Llama in Hugging Face format, byte-level BPE, chat template
    DIR/model.gguf              the same model as GGUF (f32), for the llama.cpp engine
    DIR/adapters/<tenant>/v1/   PEFT LoRA adapters (different ranks and target modules)
    DIR/lorabox.toml            config pointing at the above, state in DIR/state
    DIR/keys.json               {"tenant": "plaintext key"}, mode 0600 (demo only)

The same files are the test suite's fixture. Weights come from seeded generators, so two runs
write the same model and adapters; keys are random and are kept when the directory already has
them. The weights are scaled so that greedy decoding has clear margins between the best and the
second-best token: two correct engines then agree token for token instead of flipping on ties.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "lorabox-demo"

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
VOCAB_SIZE = 512
# Default init is std 0.02: logits then sit within ~0.2 of each other and greedy picks ride on
# float noise. Scaling the output projection spreads them by a few units.
LM_HEAD_SCALE = 25.0
LORA_B_STD = 0.08

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header|>", "<|end_header|>", "<|eot|>"]
BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header|>' + message['role'] + '<|end_header|>' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header|>assistant<|end_header|>' }}{% endif %}"
)

_CORPUS = """\
lorabox serves one base model and one adapter per tenant from a single box.
Every client of the agency gets answers shaped by its own adapter, and no client ever sees
another client's adapter or cached prompt. The operator drops a folder, the daemon picks it up,
and the next request is answered by the new version. Hello, how can I help you today?
The quick brown fox jumps over the lazy dog. Support tickets, invoices, shipping labels,
product descriptions and friendly replies: small models do small jobs well and cheaply.
"""


@dataclass(frozen=True)
class DemoTenant:
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


def build_tokenizer(out_dir: Path) -> None:
    """Train a small byte-level BPE on a fixed corpus and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _control_ids(tokenizer) -> set[int]:  # type: ignore[no-untyped-def]
    return {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != EOS}


def build_model(model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        dtype="float32",
        **MODEL_SHAPE,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        # Only multi-character word pieces and EOS may be generated: single bytes could form
        # partial UTF-8 and the chat markers would confuse the template. Their rows stay small
        # so the word pieces always win by a wide margin.
        muted = [
            i for tok, i in tokenizer.get_vocab().items() if len(tok) == 1 or i in _control_ids(tokenizer)
        ]
        model.lm_head.weight[muted] /= LM_HEAD_SCALE * 10
    model.generation_config.do_sample = False
    model.save_pretrained(model_dir, safe_serialization=True)


def build_adapter(model_dir: Path, tenant: DemoTenant, out_dir: Path) -> None:
    """A PEFT LoRA adapter with seeded, non-zero A and B (PEFT itself initialises B to zero).

    Written directly in PEFT's on-disk format (PEFT's own LoraConfig, tensors named and shaped
    after the base model's layers), which is fast enough to make hundreds for tests.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from .adapters.drops import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, BaseModelInfo

    base = BaseModelInfo.from_model_dir(model_dir)
    generator = torch.Generator().manual_seed(tenant.seed)
    tensors = {}
    for path, (out_features, in_features) in sorted(base.linear_shapes.items()):
        if path.rsplit(".", 1)[-1] in tenant.target_modules:
            lora_a = torch.randn((tenant.rank, in_features), generator=generator) / in_features**0.5
            lora_b = torch.randn((out_features, tenant.rank), generator=generator) * LORA_B_STD
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_a
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_b
    config = LoraConfig(
        r=tenant.rank,
        lora_alpha=tenant.alpha,
        target_modules=sorted(tenant.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=DEMO_MODEL_NAME,
    ).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def ensure_builtin_model(state_dir: Path) -> Path:
    """The demo model as the base when no model is configured, built once under state_dir."""
    return _ensure_model(state_dir / "demo-model")


def _ensure_model(model_dir: Path) -> Path:
    if not (model_dir / "model.safetensors").exists():
        tmp = model_dir.with_name(f".{model_dir.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build_model(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
    return model_dir


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
    from .config import load_config
    from .tenancy.store import Store

    demo_dir = demo_dir.resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    if force:
        shutil.rmtree(demo_dir / "model", ignore_errors=True)
    model_dir = _ensure_model(demo_dir / "model")
    gguf_path = demo_dir / "model.gguf"
    weights = model_dir / "model.safetensors"
    if force or not gguf_path.exists() or gguf_path.stat().st_mtime_ns < weights.stat().st_mtime_ns:
        from .gguf.model import write_model

        write_model(model_dir, gguf_path, "f32", name=DEMO_MODEL_NAME)
    for tenant in DEMO_TENANTS:
        version_dir = demo_dir / "adapters" / tenant.name / "v1"
        if force or not (version_dir / "adapter_model.safetensors").exists():
            # Build under a dot name and rename, as the drop-folder contract asks of everyone.
            tmp = version_dir.parent / ".v1.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            build_adapter(model_dir, tenant, tmp)
            shutil.rmtree(version_dir, ignore_errors=True)
            tmp.rename(version_dir)

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
