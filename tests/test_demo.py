"""The built-in demo: committed weights that match their recipe, a deterministic `demo init`, and
tenants that answer the README's greeting each in its own voice, through a live server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from openai import OpenAI

from appliance.adapters.drops import AdapterLimits, BaseModelInfo, judge
from appliance.demo import training as demo_training
from appliance.demo.build import (
    CHAT_TEMPLATE,
    DEMO_DATA_DIR,
    DEMO_GREETING,
    DEMO_MODEL_NAME,
    DEMO_TENANTS,
    GREETING_MAX_TOKENS,
    MODEL_SHAPE,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    init_demo,
)
from appliance.ops.cli import greeting_answers, tool_call_answer

README = Path(__file__).parents[1] / "README.md"
GREETING = [{"role": "user", "content": DEMO_GREETING}]
# What makes each voice recognisable; the base model's generic answer has none of them.
VOICE_MARKS = {"acme": "Acme support", "globex": "legal assistant", "initech": "IT help desk"}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the committed files ------------------------------------------------------------------------


def test_committed_files_are_what_the_training_recipe_wrote():
    """Change the recipe (voices, text, shapes, hyper-parameters) and this fails until the files
    are retrained and committed: `python -m appliance.demo.training`."""
    manifest = json.loads((DEMO_DATA_DIR / demo_training.MANIFEST).read_text())
    assert manifest["recipe"] == demo_training.recipe_fingerprint(), "retrain: the recipe changed"
    assert manifest["files"] == demo_training.file_hashes(DEMO_DATA_DIR)


def test_committed_model_has_the_shape_and_tokenizer_the_code_expects():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    config = json.loads((DEMO_DATA_DIR / "model" / "config.json").read_text())
    assert {key: config[key] for key in MODEL_SHAPE} == MODEL_SHAPE
    assert (config["model_type"], config["dtype"], config["vocab_size"]) == ("llama", "float32", VOCAB_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DATA_DIR / "model")
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_token, tokenizer.eos_token) == (SPECIAL_TOKENS[0], SPECIAL_TOKENS[1])
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # GPT-2's pre-tokenizer exactly (llama.cpp's `gpt2`): byte-level, no prefix space, no normalizer.
    raw = json.loads(Tokenizer.from_file(str(DEMO_DATA_DIR / "model" / "tokenizer.json")).to_str())
    assert raw["normalizer"] is None
    assert raw["model"]["type"] == "BPE"
    assert raw["pre_tokenizer"]["type"] == "ByteLevel"
    assert (raw["pre_tokenizer"]["add_prefix_space"], raw["pre_tokenizer"]["use_regex"]) == (False, True)


@pytest.mark.parametrize("tenant", DEMO_TENANTS, ids=lambda t: t.name)
def test_committed_adapters_have_each_tenants_rank_and_modules(tenant, tmp_path):
    folder = DEMO_DATA_DIR / "adapters" / tenant.name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (tenant.rank, tenant.alpha)
    assert config["target_modules"] == sorted(tenant.target_modules)
    base = BaseModelInfo.from_model_dir(DEMO_DATA_DIR / "model")
    shutil.copytree(folder, tmp_path / tenant.name / "v1")  # as `demo init` lays it out
    found = judge(tenant.name, "v1", tmp_path, base, AdapterLimits(max_rank=16))
    assert (found.state, found.reason) == ("ready", "")


# -- demo init ----------------------------------------------------------------------------------


def test_demo_init_writes_the_same_bytes_every_time(tmp_path):
    """Two runs write identical model and adapter files (the committed ones); a damaged or older
    copy is put back."""
    first, second = tmp_path / "first", tmp_path / "second"
    init_demo(first)
    init_demo(second)
    written = {part: tree(first / part) for part in ("model", "adapters")}
    assert written == {part: tree(second / part) for part in ("model", "adapters")}
    assert written["model"] == tree(DEMO_DATA_DIR / "model")
    for tenant in DEMO_TENANTS:
        assert tree(first / "adapters" / tenant.name / "v1") == tree(DEMO_DATA_DIR / "adapters" / tenant.name)

    (first / "model" / "model.safetensors").write_bytes(b"an older demo")
    (first / "adapters" / "acme" / "v1" / "stray.txt").write_text("left behind")
    keys = json.loads((first / "keys.json").read_text())
    assert init_demo(first) == keys
    assert {part: tree(first / part) for part in ("model", "adapters")} == written


# -- the voices, through a live server ----------------------------------------------------------


def greet(server, tenant: str, model: str) -> tuple[str, str | None]:
    client = OpenAI(base_url=server.base_url, api_key=server.demo.keys[tenant], max_retries=0)
    response = client.chat.completions.create(
        model=model, messages=GREETING, max_tokens=GREETING_MAX_TOKENS, temperature=0
    )
    return response.choices[0].message.content or "", response.choices[0].finish_reason


def test_each_tenant_answers_the_greeting_in_its_own_voice(server, reference):
    answers = {name: greet(server, name, name) for name in VOICE_MARKS}
    answers[DEMO_MODEL_NAME] = greet(server, "acme", DEMO_MODEL_NAME)
    texts = {name: text for name, (text, _) in answers.items()}
    assert len(set(texts.values())) == len(texts), texts  # four different answers
    for name, (text, finish_reason) in answers.items():
        adapter = None if name == DEMO_MODEL_NAME else name
        expected, margin = reference.generate_with_margin(
            adapter, reference.chat_ids(GREETING), GREETING_MAX_TOKENS
        )
        assert text == reference.text(expected), name
        assert finish_reason == "stop", name  # a whole answer, not one cut at max_tokens
        assert margin > 0.5, (name, margin)
        marks = {tenant for tenant, mark in VOICE_MARKS.items() if mark in text}
        assert marks == ({name} if adapter else set()), (name, text)


def test_demo_announcement_shows_every_voice(server, reference):
    """What `lorabox demo` prints once the engine is ready: each voice's answer to the greeting."""
    shown = greeting_answers(server.url, server.demo.keys)
    assert [model for model, _ in shown] == [DEMO_MODEL_NAME, *sorted(server.demo.keys)]
    for model, answer in shown:
        adapter = None if model == DEMO_MODEL_NAME else model
        assert answer == reference.text(
            reference.generate(adapter, reference.chat_ids(GREETING), GREETING_MAX_TOKENS)
        )


def test_readme_shows_the_answers_the_demo_gives(reference):
    readme = README.read_text()
    assert f'"content": "{DEMO_GREETING}"' in readme
    for adapter in [None, *VOICE_MARKS]:
        answer = reference.text(
            reference.generate(adapter, reference.chat_ids(GREETING), GREETING_MAX_TOKENS)
        )
        assert answer in readme, (adapter, answer)


def test_demo_announcement_shows_acmes_tool_call(server):
    """`lorabox demo` shows acme calling its tool; the README shows the same call."""
    shown = tool_call_answer(server.url, server.demo.keys)
    assert shown == 'track_parcel({"order_id": "48213"})'
    assert shown in README.read_text()
