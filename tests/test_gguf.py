"""GGUF conversion, checked tensor by tensor against the Hugging Face and PEFT files it came from.

The documented layout change (llama.cpp's `LlamaModel.permute`): within each head of q_proj and
k_proj, GGUF row 2i is Hugging Face row i and GGUF row 2i+1 is row i + head_dim/2 (llama.cpp rotates
adjacent pairs, Hugging Face rotates halves). A LoRA's lora_b on q/k follows its weight's rows;
lora_a and every other tensor are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from appliance.adapters.drops import AdapterLimits, BaseModelInfo, judge
from appliance.demo.build import DEMO_MODEL_NAME, DEMO_TENANTS
from appliance.engines.llamacpp import LlamaCppEngine
from appliance.engines.vllm import VLLMEngine
from appliance.errors import AdapterError
from appliance.gguf import EXPORT_QUANTS
from appliance.gguf.adapterfile import GGUF_FILE, dropped_gguf
from appliance.gguf.export import FLOAT_QUANTS, LLAMA_QUANTS
from appliance.gguf.layout import read_hf_config
from appliance.gguf.lora import BaseGGUF, cached_lora
from appliance.gguf.ollama import Untranslatable, go_chat_template, write_modelfile
from appliance.tenancy.store import AdapterVersion
from tests.conftest import Demo


def gguf_rows(hf_rows: np.ndarray, n_head: int) -> np.ndarray:
    """The layout change, written as the rule above says (not as the converter computes it)."""
    head_dim = hf_rows.shape[0] // n_head
    order = [
        h * head_dim + i + half
        for h in range(n_head)
        for i in range(head_dim // 2)
        for half in (0, head_dim // 2)
    ]
    return hf_rows[order]


def read_tensors(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    # GGUF shapes are innermost-first; numpy's data view is already (rows, columns).
    return reader, {t.name: np.array(t.data) for t in reader.tensors}


def heads_of(demo: Demo) -> dict[str, int]:
    config = read_hf_config(demo.model_dir)
    return {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}


def test_base_model_tensors_equal_the_hf_weights_after_the_layout_change(demo):
    weights = load_file(demo.model_dir / "model.safetensors")
    _, tensors = read_tensors(demo.dir / "model.gguf")
    heads = heads_of(demo)
    for layer in range(read_hf_config(demo.model_dir)["num_hidden_layers"]):
        for hf, name in [
            ("q_proj", "attn_q"),
            ("k_proj", "attn_k"),
            ("v_proj", "attn_v"),
            ("o_proj", "attn_output"),
        ]:
            hf_weight = weights[f"model.layers.{layer}.self_attn.{hf}.weight"].numpy()
            expected = gguf_rows(hf_weight, heads[hf]) if hf in heads else hf_weight
            assert np.array_equal(tensors[f"blk.{layer}.{name}.weight"], expected), (layer, hf)
    assert np.array_equal(tensors["token_embd.weight"], weights["model.embed_tokens.weight"].numpy())
    assert np.array_equal(tensors["output.weight"], weights["lm_head.weight"].numpy())


@pytest.mark.parametrize("tenant", [t.name for t in DEMO_TENANTS])
def test_lora_tensors_equal_the_peft_tensors_after_the_layout_change(demo, tmp_path, tenant):
    folder = demo.adapter_dir(tenant)
    converted = cached_lora(folder, BaseGGUF.read(demo.dir / "model.gguf"), tmp_path)
    reader, tensors = read_tensors(converted)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(config["lora_alpha"])

    peft = load_file(folder / "adapter_model.safetensors")
    heads = heads_of(demo)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    seen = set()
    for key, value in peft.items():
        layer, module, kind = re.fullmatch(r".*layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight", key).groups()  # type: ignore[union-attr]
        gguf_name = f"blk.{layer}.{names[module]}.weight.lora_{kind.lower()}"
        expected = value.numpy()
        if kind == "B" and module in heads:
            expected = gguf_rows(expected, heads[module])
        assert np.array_equal(tensors[gguf_name], expected), key
        seen.add(gguf_name)
    assert seen == set(tensors)  # nothing more, nothing less


def test_conversion_is_cached_by_content(demo, tmp_path):
    base = BaseGGUF.read(demo.dir / "model.gguf")
    folder = demo.adapter_dir(DEMO_TENANTS[0].name)
    first = cached_lora(folder, base, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_lora(folder, base, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # not written again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def _copy(demo: Demo, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    source = demo.adapter_dir(DEMO_TENANTS[0].name)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


def _nan_weights(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, folder / "adapter_model.safetensors")


def _lone_lora_a(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[next(n for n in sorted(tensors) if n.endswith("lora_B.weight"))]
    save_file(tensors, folder / "adapter_model.safetensors")


def _truncated(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [
        (_nan_weights, "not all finite numbers"),
        (_lone_lora_a, "pairs incomplete"),
        (_truncated, "cannot read the adapter"),
    ],
)
def test_malformed_adapter_is_refused_with_a_reason(demo, tmp_path, breaker, reason):
    folder = _copy(demo, tmp_path)
    breaker(folder)
    with pytest.raises(AdapterError, match=reason):
        cached_lora(folder, BaseGGUF.read(demo.dir / "model.gguf"), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_a_per_module_alpha_is_folded_into_that_modules_lora_b(demo, tmp_path):
    """llama.cpp scales every pair by the file's alpha / the pair's rank: a module whose alpha
    differs (alpha_pattern) gets the rest of PEFT's scale in its lora_b, the others are unchanged."""
    folder = _copy(demo, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
    config["alpha_pattern"] = {"model.layers.1.self_attn.q_proj": 48}  # scale 6 where the file says 2
    (folder / "adapter_config.json").write_text(json.dumps(config))
    _, tensors = read_tensors(cached_lora(folder, BaseGGUF.read(demo.dir / "model.gguf"), tmp_path / "c"))
    _, plain = read_tensors(
        cached_lora(
            demo.adapter_dir(DEMO_TENANTS[0].name), BaseGGUF.read(demo.dir / "model.gguf"), tmp_path / "p"
        )
    )
    for name in plain:
        factor = 3 if name == "blk.1.attn_q.weight.lora_b" else 1
        assert np.allclose(tensors[name], plain[name] * factor, rtol=1e-6, atol=0), name


def test_adapter_for_a_different_base_is_refused(demo, tmp_path):
    folder = _copy(demo, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("lora_A.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] * 2)  # a wider base
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="but the base GGUF's"):
        cached_lora(folder, BaseGGUF.read(demo.dir / "model.gguf"), tmp_path / "cache")


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of the only Go constructs the translation emits: a range over .Messages."""
    literal = lambda text: text.replace('{{ "{{" }}', "{{")  # noqa: E731
    head, rest = template.split("{{ range .Messages }}")
    turn, tail = rest.split("{{ end }}")
    before, after = turn.split("{{ .Content }}")
    out = literal(head)
    for m in messages:
        out += literal(before).replace("{{ .Role }}", m["role"]) + m["content"] + literal(after)
    return out + literal(tail)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "A lamp {{ .Role }}?"},
            {"role": "assistant", "content": "Bright."},
            {"role": "user", "content": "More."},
        ],
    ],
)
def test_ollama_template_renders_conversations_as_the_jinja_one_does(demo, messages):
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    template, end_of_turn = go_chat_template(tokenizer)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_go(template, messages) == expected
    assert end_of_turn
    assert end_of_turn in expected


@pytest.mark.parametrize(
    "template",
    [
        # System messages written differently from the others.
        "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
        "{% else %}[{{ m['role'] }}]{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        # Content trimmed, which Go's {{ .Content }} would not do.
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
    ],
    ids=["system-apart", "trimmed"],
)
def test_untranslatable_template_leaves_a_note_instead_of_a_wrong_template(demo, tmp_path, template):
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    tokenizer.chat_template = template
    with pytest.raises(Untranslatable):
        go_chat_template(tokenizer)
    modelfile = write_modelfile(tmp_path / "x.gguf", tokenizer, "test").read_text()
    assert "TEMPLATE" not in modelfile.replace("No TEMPLATE", "")
    assert "could not be translated" in modelfile
    assert "FROM ./x.gguf" in modelfile


def test_export_quants_offered_are_those_implemented():
    assert (*FLOAT_QUANTS, *LLAMA_QUANTS) == EXPORT_QUANTS


# -- GGUF LoRAs dropped as they are (made by llama.cpp's tools; lorabox's converter writes the same) --


def gguf_drop(demo: Demo, root: Path, version: str = "v1", *, edit: Any = None) -> Path:
    """acme's adapter as a GGUF LoRA, dropped as adapters/acme/<version>/adapter_model.gguf."""
    converted = cached_lora(demo.adapter_dir("acme"), BaseGGUF.read(demo.dir / "model.gguf"), root / "cache")
    folder = root / "adapters" / "acme" / version
    folder.mkdir(parents=True)
    data = converted.read_bytes()
    (folder / GGUF_FILE).write_bytes(edit(data) if edit else data)
    return folder


def judged(demo: Demo, root: Path, engine: type, version: str = "v1") -> AdapterVersion:
    base = BaseModelInfo.from_model_dir(demo.model_dir).named(DEMO_MODEL_NAME)
    limits = AdapterLimits(max_rank=16, support=engine.adapter_support)
    return judge("acme", version, root / "adapters", base, limits)


def test_a_gguf_lora_drop_is_checked_against_the_base_and_accepted_by_llamacpp(demo, tmp_path):
    folder = gguf_drop(demo, tmp_path)
    found = judged(demo, tmp_path, LlamaCppEngine)
    assert (found.state, found.reason, found.rank, found.target_modules) == (
        "ready",
        "",
        8,
        ("q_proj", "v_proj"),
    )
    assert found.sha256 == hashlib.sha256((folder / GGUF_FILE).read_bytes()).hexdigest()
    assert dropped_gguf(folder) == folder / GGUF_FILE


def test_a_gguf_lora_drop_is_refused_by_vllm_naming_the_way_out(demo, tmp_path):
    gguf_drop(demo, tmp_path)
    found = judged(demo, tmp_path, VLLMEngine)
    assert found.state == "refused"
    assert found.reason == (
        "adapter_model.gguf is a GGUF LoRA, which the vLLM engine does not load; drop the PEFT adapter it "
        "was converted from (adapter_config.json and adapter_model.safetensors) instead"
    )


def _renamed(old: bytes, new: bytes) -> Any:
    assert len(old) == len(new)
    return lambda data: data.replace(old, new)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            _renamed(b"blk.1.attn_q.weight.lora_a", b"blk.7.attn_q.weight.lora_a"),
            "lora_a/lora_b pairs incomplete for 'blk.",
        ),
        (
            lambda data: data.replace(b"blk.1.attn_q.weight.lora_", b"blk.7.attn_q.weight.lora_"),
            "adapts 'blk.7.attn_q.weight', which the base model does not have",
        ),
        (
            _renamed(
                b"adapter.type\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00lora",
                b"adapter.type\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00lokr",
            ),
            "is not a LoRA adapter",
        ),
        (
            lambda data: b"GGUF" + data[4:8] + (10**9).to_bytes(8, "little") + data[16:],
            "declares 1000000000 tensors",
        ),
        (lambda data: data[:200], "is not a readable GGUF file"),
        (lambda data: b"not a gguf file at all, no", "is not a GGUF file"),
    ],
    ids=["unpaired", "missing-layer", "not-lora", "huge-count", "truncated", "not-gguf"],
)
def test_a_gguf_lora_drop_that_does_not_fit_is_refused(demo, tmp_path, edit, reason):
    gguf_drop(demo, tmp_path, edit=edit)
    found = judged(demo, tmp_path, LlamaCppEngine)
    assert found.state == "refused"
    assert reason in found.reason
