"""The tokenizer of a Hugging Face model, written into a GGUF file the way llama.cpp reads it.

lorabox tokenizes on its own side and hands engines token ids, so the GGUF's tokenizer matters to
llama.cpp's load-time checks and to an exported model used on its own (llama.cpp, Ollama). It must
then split text exactly as the Hugging Face tokenizer does. llama.cpp recognises a byte-level BPE
pre-tokenizer by name; lorabox names the ones it can verify from tokenizer.json alone and refuses
the others with a reason (llama.cpp's converter identifies them by hashing test encodings instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ..errors import ConversionError


def byte_level_pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenization, or ConversionError."""
    pre = spec.get("pre_tokenizer") or {}
    gpt2 = (
        pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and spec.get("normalizer") is None
    )
    if gpt2:
        return "gpt-2"  # GPT-2's regex split, no prefix space, no normalizer (llama.cpp spells it so)
    raise ConversionError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one lorabox can name for "
        "llama.cpp; convert the model with llama.cpp's convert_hf_to_gguf.py and set gguf_model"
    )


def add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Token list and types, merges, special token ids, add-BOS flag and chat template."""
    from transformers import AutoTokenizer

    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{model_dir}: cannot read tokenizer.json ({exc})") from exc
    if spec.get("model", {}).get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise ConversionError(
            "lorabox writes byte-level BPE tokenizers only; convert the model with llama.cpp's "
            "convert_hf_to_gguf.py and set gguf_model"
        )
    pre = byte_level_pre_tokenizer(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    control, user_defined = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            if token_id in added:
                types.append(control if added[token_id].special else user_defined)
            else:
                types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    # Whatever the tokenizer files say or omit, llama.cpp must add BOS and EOS exactly when HF does.
    probe = list(tokenizer("a").input_ids)
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
