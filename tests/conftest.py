"""Shared fixtures. The expensive ones (demo files, a running server, the HF reference) are
session-scoped: one engine start per test run."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.demo import DEMO_MODEL_NAME, init_demo
from appliance.localserver import LocalServer, ServerFailed

SERVER_START_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def _isolate_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the machine's lorabox config or writes into the user's data directory."""
    for name in list(os.environ):
        if name.startswith("LORABOX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@dataclass
class Demo:
    dir: Path
    keys: dict[str, str]

    @property
    def config(self) -> Path:
        return self.dir / "lorabox.toml"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def database(self) -> Path:
        return self.dir / "state" / "lorabox.db"

    def adapter_dir(self, tenant: str, version: str = "v1") -> Path:
        return self.dir / "adapters" / tenant / version


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    directory = tmp_path_factory.mktemp("demo")
    return Demo(directory, init_demo(directory))


@pytest.fixture(scope="session")
def server(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`lorabox serve` as a real subprocess, as systemd would run it, on a free port."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    try:
        running = LocalServer.start(demo.config, log_path, timeout_s=SERVER_START_TIMEOUT_S)
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield Server(running, demo)
    running.stop()


@dataclass
class Server:
    local: LocalServer
    demo: Demo

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def base_url(self) -> str:
        return self.local.base_url


@dataclass
class Reference:
    """Hugging Face transformers + PEFT, fp32, greedy: the independent source of truth."""

    demo: Demo
    _models: dict[Path | None, Any] = field(default_factory=dict)
    _cache: dict[tuple[Any, ...], tuple[list[int], float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.demo.model_dir)

    def _model(self, adapter: str | Path | None) -> Any:
        """adapter: a demo tenant's name (its v1), an adapter folder, or None for the base model."""
        folder = self.demo.adapter_dir(adapter) if isinstance(adapter, str) else adapter
        if folder not in self._models:
            import torch
            from peft import PeftModel
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(self.demo.model_dir, dtype=torch.float32)
            if folder is not None:
                model = PeftModel.from_pretrained(model, folder)
            self._models[folder] = model.eval()
        return self._models[folder]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def generate(self, tenant: str | Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        return self.generate_with_margin(tenant, prompt_ids, max_tokens)[0]

    def generate_with_margin(
        self, tenant: str | Path | None, prompt_ids: list[int], max_tokens: int
    ) -> tuple[list[int], float]:
        """Greedy tokens, and the smallest gap between the best and second-best logit seen."""
        key = (tenant, tuple(prompt_ids), max_tokens)
        if key not in self._cache:
            import torch

            with torch.no_grad():
                out = self._model(tenant).generate(
                    torch.tensor([prompt_ids]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.eos_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            tokens = out.sequences[0, len(prompt_ids) :].tolist()
            margin = min(float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores)
            self._cache[key] = (tokens, margin)
        return self._cache[key]

    def text(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


@pytest.fixture(scope="session")
def reference(demo: Demo) -> Reference:
    return Reference(demo)


@pytest.fixture(scope="session")
def base_model_name() -> str:
    return DEMO_MODEL_NAME


def post_json(url: str, body: Any, key: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    """A plain HTTP POST (no client library) for hostile-input tests; returns (status, JSON)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")  # noqa: S310 (loopback only)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())
