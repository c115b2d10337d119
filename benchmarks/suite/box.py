"""The box a benchmark serves from: the built-in demo (its tiny model, three tenants with trained
adapters, their keys), or, with `--model DIR`, the same tenants on a real Hugging Face model, for a
GPU owner's figures: the config then names that model (in `dtype`, with `max_model_len`) and each demo
tenant's adapter is rebuilt with random weights of its rank and target modules for that model's
shapes (appliance/demo/build.py's build_adapter reads the shapes from the safetensors headers, never
the weights). Such a box runs vLLM only: there is no GGUF of the model."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from appliance.demo.build import DEMO_TENANTS, DemoTenant, build_adapter, init_demo
from appliance.tenancy.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="a real model's folder (default: the built-in demo model)")
    parser.add_argument("--dtype", default="bfloat16", help="with --model (default bfloat16)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="with --model (default 4096)")


def build(folder: Path, args: argparse.Namespace) -> dict[str, str]:
    """The box in `folder`; returns {tenant: key}. `args` from a parser given `add_arguments`."""
    keys = init_demo(folder)
    model = getattr(args, "model", None)
    if model is None:
        return keys
    model = Path(model).resolve()
    config = folder / "lorabox.toml"
    text = config.read_text()
    for name, value in (("model", str(model)), ("dtype", args.dtype), ("max_model_len", args.max_model_len)):
        text = re.sub(rf"(?m)^{name} = .*$", f"{name} = {value!r}".replace("'", '"'), text)
    config.write_text(re.sub(r"(?m)^gguf_model = .*\n", "", text))
    for tenant in DEMO_TENANTS:
        target = folder / "adapters" / tenant.name / "v1"
        shutil.rmtree(target)
        build_adapter(model, tenant, target)
    return keys


def model_dir(folder: Path, args: argparse.Namespace) -> Path:
    """The model the box serves: what HF transformers + PEFT references are computed on."""
    model = getattr(args, "model", None)
    return Path(model).resolve() if model is not None else folder / "model"


def add_tenants(folder: Path, names: list[str], seed: int, model: Path | None = None) -> dict[str, str]:
    """More tenants in the box, each with a v1 adapter of random weights (rank 8, alpha 16, q_proj
    and v_proj, as the demo's) on `model` (default: the box's own); returns {tenant: key}."""
    keys = {}
    with Store.open(folder / "state" / "lorabox.db") as store:
        for i, name in enumerate(names):
            tenant = DemoTenant(name, 8, 16, ("q_proj", "v_proj"), seed + i)
            build_adapter(model or folder / "model", tenant, folder / "adapters" / name / "v1")
            store.add_tenant(name)
            keys[name] = store.issue_key(name).plaintext
    return keys
