"""The base model: where `model` in the settings points, fetched from Hugging Face when it is an id.

`model` is empty (the built-in demo model), a local folder in Hugging Face format, or a Hugging
Face id (`org/name`). An id is downloaded once, into `<state_dir>/models/<org>--<name>`, at install
(`lorabox model fetch`) or else at the daemon's first start, with progress on stderr (the journal).
The download goes to a dot-named folder beside it and is renamed into place when complete, the
drop folder's own contract: an interrupted download resumes next time and is never mistaken for a
model. Only what lorabox serves from is fetched: configs, tokenizer files and safetensors weights
(no pickled checkpoints, which lorabox never opens).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LoraboxError
from .settings import Settings

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
FETCHED = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model", "*.tiktoken"]

Download = Callable[..., Any]
"""huggingface_hub.snapshot_download's signature (repo_id, local_dir=, allow_patterns=)."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "builtin" | "folder" | "hub"
    path: Path
    """The Hugging Face format folder served from (for "hub": once fetched)."""
    repo_id: str = ""

    @property
    def fetched(self) -> bool:
        return (self.path / "config.json").is_file()

    def describe(self) -> str:
        if self.kind == "builtin":
            return f"the built-in demo model ({self.path})"
        if self.kind == "hub":
            return f"Hugging Face {self.repo_id} ({self.path}{'' if self.fetched else ', not fetched yet'})"
        return str(self.path)


def model_source(settings: Settings) -> ModelSource:
    """What `model` names; a path that exists, or reads as one, is a folder, never an id."""
    text = settings.model
    if not text:
        return ModelSource("builtin", settings.state_dir / "demo-model")
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith((".", "~")) or path.exists():
        return ModelSource("folder", path)
    if HUB_ID.fullmatch(text):
        return ModelSource("hub", settings.state_dir / "models" / text.replace("/", "--"), text)
    raise ConfigError(f"model: {text!r} is neither a folder nor a Hugging Face id (org/name)")


def fetch(source: ModelSource, download: Download | None = None) -> Path:
    """Download a hub model into place (a no-op once it is there); returns its folder."""
    if source.kind != "hub" or source.fetched:
        return source.path
    if download is None:
        from huggingface_hub import snapshot_download

        download = snapshot_download
    staging = source.path.with_name(f".{source.path.name}.partial")
    staging.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from Hugging Face into %s", source.repo_id, source.path)
    print(f">>> Downloading {source.repo_id} into {source.path} (once; progress below)", flush=True)
    try:
        download(repo_id=source.repo_id, local_dir=str(staging), allow_patterns=FETCHED)
    except Exception as exc:  # the hub client raises many kinds; each is a plain "could not"
        raise LoraboxError(
            f"could not download {source.repo_id} from Hugging Face ({type(exc).__name__}: {exc}); "
            "check the network and the id (a gated model needs HF_TOKEN), or set model to a local folder"
        ) from exc
    if not (staging / "config.json").is_file():
        raise LoraboxError(f"{source.repo_id} has no config.json: not a model in Hugging Face format")
    staging.rename(source.path)
    return source.path


def resolve(settings: Settings, *, download: Download | None = None, allow_download: bool = True) -> Path:
    """The folder to serve from: the built-in model written, a hub model fetched if need be."""
    source = model_source(settings)
    if source.kind == "builtin":
        from ..demo.build import ensure_builtin_model

        return ensure_builtin_model(settings.state_dir)
    if source.kind == "hub":
        if not source.fetched and not allow_download:
            raise LoraboxError(f"{source.repo_id} is not downloaded yet: lorabox model fetch")
        fetch(source, download)
    if not (source.path / "config.json").is_file():
        raise ConfigError(
            f"model: {source.path} has no config.json (a model folder in Hugging Face format expected)"
        )
    return source.path
