"""Adapters as training tools write them: each is served exactly, or refused saying why, on both engines.

The variants (tests/adapter_variants.py) are built once with PEFT on the demo base. For each, on
each engine, the adapter check either accepts it, and the engine's answers then equal HF
transformers + PEFT token for token on several prompts, or refuses it with a reason naming the
option. None may be served with different output. Refusals are decided by the check alone (no
engine needed); the served variants go through the session's two daemons, dropped as versions of
one tenant, where the daemon's verdict on every variant must be the check's.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from appliance.adapters.drops import AdapterLimits, BaseModelInfo, judge
from appliance.api.adminclient import AdminClient
from appliance.demo.build import DEMO_MODEL_NAME
from appliance.engines.base import AdapterSupport
from appliance.engines.llamacpp import LlamaCppEngine
from appliance.engines.vllm import VLLMEngine
from appliance.tenancy.store import AdapterVersion, Store
from tests.adapter_variants import CONFIG, ENGINES, VARIANTS, Variant, build_all
from tests.conftest import Demo, Reference, Server

PROMPTS = ["Hello, how can I help", "The quick brown fox", "Support tickets and invoices"]
MAX_TOKENS = 12
TENANT = "variants"
SUPPORT: dict[str, AdapterSupport] = {
    "vllm": VLLMEngine.adapter_support,
    "llamacpp": LlamaCppEngine.adapter_support,
}
MAX_RANK = 16  # the demo's max_lora_rank
# A served variant must leave the engines room: fp32 engines differ from the reference by ~1e-5.
MIN_MARGIN = 0.01


@pytest.fixture(scope="module")
def variants(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_all(demo.model_dir, tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def verdicts(variants: dict[str, Path], demo: Demo) -> dict[tuple[str, str], AdapterVersion]:
    """The adapter check's verdict on every variant for every engine: (variant, engine) → verdict."""
    base = BaseModelInfo.from_model_dir(demo.model_dir).named(DEMO_MODEL_NAME)
    root = next(iter(variants.values())).parent
    found = {}
    for variant in VARIANTS:
        for engine in ENGINES:
            limits = AdapterLimits(max_rank=MAX_RANK, support=SUPPORT[engine])
            found[(variant.name, engine)] = judge(root.name, variant.name, root.parent, base, limits)
    return found


def answer(reference: Reference, folder: Path | None, prompt: str) -> tuple[list[int], float]:
    """Greedy tokens of HF + PEFT and their smallest margin (cached: the daemons' tests reuse them)."""
    return reference.generate_with_margin(folder, reference.prompt_ids(prompt), MAX_TOKENS)


def lora_only(folder: Path, scratch: Path) -> Path:
    """The variant's lora_A/lora_B pairs alone as a plain adapter: what its weights do, for the
    variants PEFT here cannot load at all (LoftQ needs scipy; a resized vocabulary another base;
    an unconverted CorDA adapter the covariances it was made with)."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if ".lora_" in k}
    config = json.loads((folder / CONFIG).read_text())
    plain = {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "task_type")}
    scratch.mkdir(parents=True, exist_ok=True)
    save_file(tensors, scratch / "adapter_model.safetensors")
    (scratch / CONFIG).write_text(json.dumps(plain | {"init_lora_weights": True}))
    return scratch


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_each_variants_weights_change_the_base_models_output(
    variant: Variant, variants: dict[str, Path], reference: Reference, tmp_path: Path
) -> None:
    """A variant whose weights did nothing would equal the reference whatever an engine did with it."""
    folder = variants[variant.converted_from or variant.name]
    served = any(variant.served_on(e) for e in ENGINES)
    try:
        answer(reference, folder, PROMPTS[0])
    except (ImportError, RuntimeError, ValueError):  # PEFT here cannot load it: its LoRA weights alone
        assert not served
        folder = lora_only(folder, tmp_path / "plain")
    differs = (answer(reference, folder, p)[0] != answer(reference, None, p)[0] for p in PROMPTS)
    assert any(differs)  # stops at the first prompt answered differently
    if served:  # all its answers are needed anyway, by the daemons' tests
        assert min(answer(reference, folder, p)[1] for p in PROMPTS) > MIN_MARGIN


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_the_check_serves_or_refuses_each_variant_naming_the_option(
    variant: Variant, engine: str, verdicts: dict[tuple[str, str], AdapterVersion]
) -> None:
    verdict = verdicts[(variant.name, engine)]
    if variant.served_on(engine):
        assert (verdict.state, verdict.reason) == ("ready", "")
        return
    assert verdict.state == "refused"
    assert variant.refused[engine] in verdict.reason
    if all(variant.served_on(e) for e in ENGINES if e != engine):  # this engine's own limit: named
        assert SUPPORT[engine].engine in verdict.reason


class Box:
    """One daemon with every variant dropped as a version of one tenant."""

    def __init__(self, server: Server, variants: dict[str, Path]):
        self.server, self.demo = server, server.demo
        with Store.open(self.demo.database) as store:
            if not store.get_tenant(TENANT):
                store.add_tenant(TENANT)
            self.key = store.issue_key(TENANT).plaintext
        staged = self.demo.dir / "adapters" / f".{TENANT}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        for name, folder in variants.items():
            shutil.copytree(folder, staged / name)
        staged.rename(self.folder)  # every version appears at once, as the drop contract asks

    @property
    def folder(self) -> Path:
        return self.demo.dir / "adapters" / TENANT

    def rows(self) -> dict[str, dict[str, Any]]:
        client = AdminClient(self.demo.dir / "state" / "admin.sock")
        return {
            r["version"]: r
            for r in client.call("GET", "/admin/adapters")["adapters"]
            if r["tenant"] == TENANT
        }

    def wait_registered(self, count: int, timeout: float = 120) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(rows := self.rows()) < count:
            assert time.monotonic() < deadline, f"{len(rows)} of {count} versions registered"
            time.sleep(0.2)
        return rows

    def complete(self, version: str, prompt: str) -> tuple[str, int]:
        client = OpenAI(base_url=self.server.base_url, api_key=self.key, max_retries=0, timeout=120)
        response = client.completions.create(
            model=f"{TENANT}@{version}", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert response.usage is not None
        return response.choices[0].text, response.usage.completion_tokens

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module", params=ENGINES)
def box(request: pytest.FixtureRequest, variants: dict[str, Path]) -> Iterator[tuple[str, Box]]:
    engine = request.param
    server = request.getfixturevalue("server" if engine == "vllm" else "llamacpp_server")
    dropped = Box(server, variants)
    yield engine, dropped
    dropped.remove()


def test_the_daemon_serves_each_variant_exactly_or_refuses_it_as_the_check_does(
    box: tuple[str, Box],
    verdicts: dict[tuple[str, str], AdapterVersion],
    variants: dict[str, Path],
    reference: Reference,
) -> None:
    engine, daemon = box
    rows = daemon.wait_registered(len(VARIANTS))
    served = []
    for variant in VARIANTS:
        row, verdict = rows[variant.name], verdicts[(variant.name, engine)]
        assert (row["state"], row["reason"]) == (verdict.state, verdict.reason), variant.name
        if row["state"] == "ready":
            peft = variants[variant.converted_from or variant.name]
            for prompt in PROMPTS:
                tokens = reference.generate(peft, reference.prompt_ids(prompt), MAX_TOKENS)
                served.append((variant.name, prompt, (reference.text(tokens), len(tokens))))
    # A few at once: each version's first request loads (or converts) it; the others decode meanwhile.
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: daemon.complete(job[0], job[1]), served))
    wrong = [
        (name, prompt, answer, want)
        for (name, prompt, want), answer in zip(served, got, strict=True)
        if answer != want
    ]
    assert not wrong, f"served with output other than HF + PEFT's on {engine}: {wrong}"
