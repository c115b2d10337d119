"""The independent source of truth: Hugging Face transformers + PEFT, fp32, greedy.

Tests and benchmarks compare lorabox's answers with this, token for token. It shares nothing
with the serving path (no vLLM, no lorabox tokenization code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast


class PeftReference:
    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._models: dict[Path | None, Any] = {}
        self._cache: dict[tuple[Any, ...], tuple[list[int], float]] = {}

    def adapter_folder(self, adapter: str | Path | None) -> Path | None:
        return Path(adapter) if adapter is not None else None

    def _model(self, folder: Path | None) -> Any:
        if folder not in self._models:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            if folder is not None:
                model = PeftModel.from_pretrained(model, folder)
            self._models[folder] = model.eval()
        return self._models[folder]

    def chat_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        encoded: Any = self.tokenizer.apply_chat_template(
            messages, tools=cast(Any, tools), add_generation_prompt=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def generate(
        self, adapter: str | Path | None, prompt_ids: list[int], max_tokens: int, **options: Any
    ) -> list[int]:
        """Greedy tokens; `options` go to HF generate (e.g. repetition_penalty)."""
        return self.generate_with_margin(adapter, prompt_ids, max_tokens, **options)[0]

    def generate_with_margin(
        self, adapter: str | Path | None, prompt_ids: list[int], max_tokens: int, **options: Any
    ) -> tuple[list[int], float]:
        """Greedy tokens, and the smallest gap between the best and second-best logit seen."""
        folder = self.adapter_folder(adapter)
        key = (folder, tuple(prompt_ids), max_tokens, tuple(sorted(options.items())))
        if key not in self._cache:
            import torch

            with torch.no_grad():
                settings = {
                    "max_new_tokens": max_tokens,
                    "do_sample": False,
                    "eos_token_id": self.tokenizer.eos_token_id,
                    "pad_token_id": self.tokenizer.eos_token_id,
                } | options
                out = self._model(folder).generate(
                    torch.tensor([prompt_ids]), output_scores=True, return_dict_in_generate=True, **settings
                )
            tokens = out.sequences[0, len(prompt_ids) :].tolist()
            margin = min(float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores)
            self._cache[key] = (tokens, margin)
        return self._cache[key]

    def log_softmax(
        self, adapter: str | Path | None, prompt_ids: list[int], completion_ids: list[int]
    ) -> Any:
        """The model's log-softmax over the vocabulary at each completion position (a tensor of
        len(completion_ids) rows), fed the prompt and the completion."""
        import torch

        ids = prompt_ids + completion_ids
        with torch.no_grad():
            logits = self._model(self.adapter_folder(adapter))(torch.tensor([ids])).logits[0]
        rows = logits[len(prompt_ids) - 1 : len(ids) - 1].double()
        return torch.log_softmax(rows, dim=-1)

    def next_logits(self, adapter: str | Path | None, ids: list[int]) -> Any:
        """The logits for the token after `ids` (float64)."""
        import torch

        with torch.no_grad():
            return self._model(self.adapter_folder(adapter))(torch.tensor([ids])).logits[0, -1].double()

    def text(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))
