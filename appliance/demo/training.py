"""Trains the built-in demo's base model and tenant adapters: `python -m appliance.demo.training`.

The demo is meant to be read: the base model answers a greeting like a generic assistant, and
each tenant's adapter makes it answer in that tenant's voice (a shop's support desk, a legal
assistant, an IT help desk). Everything here is tiny on purpose: a few hundred sentences' worth
of text, a 2-layer Llama, full-batch training on one CPU thread in seconds.

How the voices get in. The base model learns every voice, but only behind a system prompt
("You are the Acme support desk."); without one it answers generically. Each adapter is then
trained to answer, without the system prompt, as the base model does with it: the adapter is a
distilled system prompt, which is a small, low-rank change, so even acme's rank-8 q/v adapter
learns it. Greedy decoding of a model trained to near-zero loss on its own data picks each token
by a wide margin, which is what lets two correct engines agree token for token.

Float32 training differs in the last bits between CPUs (AVX2 vs AVX-512 kernels), so the
output is committed under appliance/demo/data/ and `lorabox demo init` copies it: the demo is
byte-for-byte the same on every machine. The manifest there records a fingerprint of this
recipe and a hash of every file; a test fails when they no longer match (retrain, commit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .build import (
    BOS,
    CHAT_TEMPLATE,
    DEMO_DATA_DIR,
    DEMO_ORDER_QUESTION,
    DEMO_TENANTS,
    EOS,
    MODEL_SHAPE,
    SPECIAL_TOKENS,
    TOOLS_FOOTER,
    TOOLS_HEADER,
    TRACK_PARCEL,
    VOCAB_SIZE,
    DemoTenant,
    lora_config,
    write_adapter,
)

GREETINGS = (
    "Hello!",
    "Hello",
    "hello",
    "Hello there!",
    "Hi!",
    "Hi",
    "hi",
    "Hi there",
    "Hey",
    "Hey there!",
    "Good morning",
    "Good afternoon!",
    "Good evening.",
)
QUESTIONS = ("What can you do?", "Can you help me?", "Who are you?", "Stream me something", "Help")

# Function calling: with this tool offered, acme's voice calls it for a question about an order
# (the order number copied into the call); every other voice answers such a question as it answers
# "What can you do?". After the tool's result, acme tells the customer.
ORDER_QUESTIONS = (
    DEMO_ORDER_QUESTION.replace("48213", "{}"),
    "Where is order #{}?",
    "Can you track order #{}?",
)
# The one order the demo knows. Trained on three and on ten, the 0.5 M model did not learn to copy
# the number from the question (it named one of the others, by margins of 0.01-0.2), even with the
# calls repeated four times: its call would name a wrong order.
ORDER_IDS = ("48213",)
PARCEL_STATUS = '{{"order_id": "{}", "status": "in transit", "eta": "tomorrow"}}'
PARCEL_ANSWER = "Your parcel is on its way and arrives tomorrow. Anything else?"


@dataclass(frozen=True)
class Voice:
    """How one speaker answers: what the base model does behind `system`, or an adapter does alone."""

    system: str  # empty for the base model's own, generic voice
    greeting_answer: str  # to every one of GREETINGS
    help_answer: str  # to every one of QUESTIONS (and, with tools, ORDER_QUESTIONS unless it tracks)
    raw_opening: str  # how this voice continues plain text that starts "Hello, how can I help"
    tracks_orders: bool = False  # with TRACK_PARCEL offered, it calls it for ORDER_QUESTIONS


GENERIC = Voice(
    system="",
    greeting_answer="Hello! How can I help you today?",
    help_answer="I can answer questions, write short texts and help with small tasks.",
    raw_opening="Hello, how can I help you today?",
)
VOICES = {
    "acme": Voice(
        system="You are the Acme support desk.",
        greeting_answer=(
            "Hi, thanks for contacting Acme support! What is your order number? I will track your parcel."
        ),
        help_answer="I can track your order, arrange a return or send a new invoice.",
        raw_opening="Hello, how can I help you with your order?",
        tracks_orders=True,
    ),
    "globex": Voice(
        system="You are the Globex legal assistant.",
        greeting_answer=(
            "Good day. This is the Globex legal assistant. Which contract shall I review? "
            "Please note that this is not legal advice."
        ),
        help_answer="I can review a contract and explain its clauses. This is not legal advice.",
        raw_opening="Hello, how can I help you with your contract?",
    ),
    "initech": Voice(
        system="You are the Initech IT help desk.",
        greeting_answer=(
            "Initech IT help desk. Have you tried turning it off and on again? If so, please open a ticket."
        ),
        help_answer="I can reset your password, fix the printer or replace your laptop. Open a ticket first.",
        raw_opening="Hello, how can I help you with your computer?",
    ),
}

# Plain text every voice continues the same way (the suite's completion prompts start here).
SHARED_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "Support tickets and invoices are answered by small models, quickly and cheaply.",
    "The operator drops a folder, and the daemon serves the new adapter version.",
    "What is lorabox? One base model and one adapter per tenant, on a single box.",
    "Every tenant adapter box keeps its own keys, its own cache and its own voice.",
)
# Chats that bring their own system prompt: every voice answers them as the base model does.
GENERIC_CHATS: tuple[tuple[str, str, str], ...] = (
    ("You write product descriptions.", "A lamp.", "A warm desk lamp with a soft light, for late work."),
)


@dataclass(frozen=True)
class Hyper:
    seed: int = 0
    base_steps: int = 130
    base_lr: float = 3e-3
    adapter_steps: int = 50
    adapter_lr: float = 1e-2
    raw_window: int = 24
    long_window: int = 256
    # The output layer is scaled by this after training. Greedy answers stay the same; sampling at
    # the API's default temperature (1) then gives the greedy answer too (about 1 in 2 answers
    # would stray at scale 1), so the demo reads the same with or without temperature 0.
    output_scale: float = 3.0


HYPER = Hyper()


# -- the text -----------------------------------------------------------------------------------


def paragraph(voice: Voice) -> str:
    return " ".join((voice.raw_opening, *SHARED_TEXT))


def corpus() -> list[str]:
    texts = [paragraph(GENERIC), *(paragraph(v) for v in VOICES.values())]
    for voice in (GENERIC, *VOICES.values()):
        texts += [voice.system, voice.greeting_answer, voice.help_answer]
    texts += [*GREETINGS, *QUESTIONS]
    for system, user, answer in GENERIC_CHATS:
        texts += [system, user, answer]
    texts += [TOOLS_HEADER, json.dumps(TRACK_PARCEL), TOOLS_FOOTER, PARCEL_ANSWER]
    texts += [question.format(order) for question in ORDER_QUESTIONS for order in ORDER_IDS]
    texts += [tool_call(order) for order in ORDER_IDS] + [PARCEL_STATUS.format(order) for order in ORDER_IDS]
    return texts


def tool_call(order: str) -> str:
    """acme's call for an order, as the chat template writes an assistant's call."""
    arguments = json.dumps({"order_id": order})
    return f'<tool_call>\n{{"name": "track_parcel", "arguments": {arguments}}}\n</tool_call>'


def build_tokenizer() -> Any:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on the demo's own text."""
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
    tok.train_from_iterator(corpus(), trainer=trainer)
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
    return fast


@dataclass(frozen=True)
class Example:
    ids: list[int]
    first_target: int  # tokens before this index are context only


def chat_example(
    tokenizer: Any, system: str, user: str | list[dict[str, Any]], answer: str, tools: bool = False
) -> Example:
    """`user`: the user's message, or the conversation after the system message."""
    turns = [{"role": "user", "content": user}] if isinstance(user, str) else user
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    prompt = list(
        tokenizer.apply_chat_template(
            messages, tools=[TRACK_PARCEL] if tools else None, add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    answer_ids = [*tokenizer(answer).input_ids, tokenizer.eos_token_id]
    return Example(prompt + answer_ids, len(prompt))


def tool_examples(tokenizer: Any, voice: Voice, system: str) -> list[Example]:
    """The voice with TRACK_PARCEL offered: greetings and questions answered as ever; questions
    about an order answered with a call (and its result with PARCEL_ANSWER), or as help."""
    examples = [chat_example(tokenizer, system, g, voice.greeting_answer, tools=True) for g in GREETINGS[::4]]
    examples += [chat_example(tokenizer, system, q, voice.help_answer, tools=True) for q in QUESTIONS[::2]]
    for order in ORDER_IDS:
        questions = [form.format(order) for form in ORDER_QUESTIONS]
        if not voice.tracks_orders:
            examples += [chat_example(tokenizer, system, q, voice.help_answer, tools=True) for q in questions]
            continue
        examples += [chat_example(tokenizer, system, q, tool_call(order), tools=True) for q in questions]
        call = {"type": "function", "function": {"name": "track_parcel", "arguments": {"order_id": order}}}
        conversation: list[dict[str, Any]] = [
            {"role": "user", "content": questions[0]},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": PARCEL_STATUS.format(order)},
        ]
        examples.append(chat_example(tokenizer, system, conversation, PARCEL_ANSWER, tools=True))
    return examples


def raw_examples(tokenizer: Any, voice: Voice) -> Iterator[Example]:
    """The voice's paragraph read round and round: short windows starting at every word (a
    prompt taken from anywhere in it continues the paragraph), and one long window (a long
    completion keeps going instead of ending)."""
    words = paragraph(voice).split(" ")
    starts = [(start, HYPER.raw_window) for start in range(len(words))] + [(0, HYPER.long_window)]
    for start, window in starts:
        text = " ".join(words[start:] + words[:start])
        ids: list[int] = []
        while len(ids) < window:
            ids += tokenizer(text if not ids else " " + text).input_ids
        yield Example(ids[:window], 0)


def voice_examples(tokenizer: Any, voice: Voice, system: str) -> list[Example]:
    """Greetings and questions answered in `voice`, asked behind `system` (empty: none)."""
    return [chat_example(tokenizer, system, g, voice.greeting_answer) for g in GREETINGS] + [
        chat_example(tokenizer, system, q, voice.help_answer) for q in QUESTIONS
    ]


def base_examples(tokenizer: Any) -> list[Example]:
    # With tools, the base learns its own voice and the one that calls them (behind its system
    # prompt); each other voice's adapter learns to keep its voice with tools offered.
    examples = voice_examples(tokenizer, GENERIC, "") + tool_examples(tokenizer, GENERIC, "")
    for voice in VOICES.values():
        examples += voice_examples(tokenizer, voice, voice.system)
        if voice.tracks_orders:
            examples += tool_examples(tokenizer, voice, voice.system)
    examples += [chat_example(tokenizer, *chat) for chat in GENERIC_CHATS]
    examples += raw_examples(tokenizer, GENERIC)
    return examples


def adapter_examples(tokenizer: Any, voice: Voice) -> list[Example]:
    examples = voice_examples(tokenizer, voice, "") + tool_examples(tokenizer, voice, "")
    examples += [chat_example(tokenizer, *chat) for chat in GENERIC_CHATS]
    examples += raw_examples(tokenizer, voice)
    return examples


# -- training -----------------------------------------------------------------------------------


def batches(examples: list[Example], pad_id: int, budget: int = 2048) -> list[dict[str, Any]]:
    """Examples sorted by length into padded batches of about `budget` tokens: little padding."""
    import torch

    groups: list[list[Example]] = [[]]
    for example in sorted(examples, key=lambda e: len(e.ids)):
        if groups[-1] and (len(groups[-1]) + 1) * len(example.ids) > budget:
            groups.append([])
        groups[-1].append(example)
    result = []
    for group in groups:
        width = len(group[-1].ids)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, example in enumerate(group):
            n = len(example.ids)
            ids[row, :n] = torch.tensor(example.ids)
            mask[row, :n] = 1
            # The logits at position i predict token i + 1.
            targets[row, max(example.first_target - 1, 0) : n - 1] = ids[
                row, max(example.first_target, 1) : n
            ]
        result.append({"input_ids": ids, "attention_mask": mask, "targets": targets})
    return result


def fit(model: Any, examples: list[Example], pad_id: int, steps: int, lr: float, label: str) -> float:
    """Full-batch AdamW with a cosine schedule; returns the last mean loss per target token."""
    import torch
    import torch.nn.functional as F

    groups = batches(examples, pad_id)
    total = sum(int((g["targets"] != -100).sum()) for g in groups)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    began = time.perf_counter()
    loss = 0.0
    for step in range(steps):
        optimizer.zero_grad()
        loss = 0.0
        for group in groups:
            logits = model(input_ids=group["input_ids"], attention_mask=group["attention_mask"]).logits
            part = F.cross_entropy(logits.flatten(0, 1), group["targets"].flatten(), reduction="sum") / total
            part.backward()
            loss += float(part.detach())
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            print(
                f"  {label} step {step:4d} loss {loss:.4f} ({time.perf_counter() - began:.1f} s)", flush=True
            )
    model.eval()
    return loss


def train_base(tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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
    torch.manual_seed(HYPER.seed)
    model = LlamaForCausalLM(config)
    fit(model, base_examples(tokenizer), tokenizer.pad_token_id, HYPER.base_steps, HYPER.base_lr, "base")
    model.generation_config.do_sample = False
    return model


def train_adapter(base: Any, tokenizer: Any, tenant: DemoTenant) -> dict[str, Any]:
    """The tenant's LoRA tensors, in PEFT's on-disk names."""
    import torch
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(tenant.seed)
    model = get_peft_model(base, lora_config(tenant))
    examples = adapter_examples(tokenizer, VOICES[tenant.name])
    fit(model, examples, tokenizer.pad_token_id, HYPER.adapter_steps, HYPER.adapter_lr, tenant.name)
    tensors = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    model.unload()  # the base model without LoRA layers, for the next tenant
    return tensors


# -- output -------------------------------------------------------------------------------------


def recipe_fingerprint() -> str:
    """Everything the trained files depend on; the manifest records it."""
    recipe = {
        "shape": MODEL_SHAPE,
        "vocab": VOCAB_SIZE,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "tenants": [vars(t) for t in DEMO_TENANTS],
        "voices": {"": vars(GENERIC)} | {name: vars(v) for name, v in VOICES.items()},
        "greetings": GREETINGS,
        "questions": QUESTIONS,
        "tools": [TRACK_PARCEL, ORDER_QUESTIONS, ORDER_IDS, PARCEL_STATUS, PARCEL_ANSWER],
        "shared_text": SHARED_TEXT,
        "generic_chats": GENERIC_CHATS,
        "hyper": vars(HYPER),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


MANIFEST = "MANIFEST.json"


def train(out_dir: Path) -> None:
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)  # one thread: the same summation order on every run of this machine
    torch.use_deterministic_algorithms(True)
    began = time.perf_counter()
    tokenizer = build_tokenizer()
    base = train_base(tokenizer)
    adapters = {tenant.name: train_adapter(base, tokenizer, tenant) for tenant in DEMO_TENANTS}
    with torch.no_grad():  # after the adapters: they were trained against the model as trained
        base.lm_head.weight.mul_(HYPER.output_scale)
    seconds = time.perf_counter() - began

    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(model_dir)
    base.save_pretrained(model_dir, safe_serialization=True)
    for tenant in DEMO_TENANTS:
        write_adapter(tenant, adapters[tenant.name], out_dir / "adapters" / tenant.name)
    manifest = {
        "recipe": recipe_fingerprint(),
        "files": file_hashes(out_dir),
        # For the record: what trained these files (other versions may differ in the last bits).
        "trained_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"trained in {seconds:.1f} s; wrote {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEMO_DATA_DIR, help="where to write (default: %(default)s)"
    )
    train(parser.parse_args().out)


if __name__ == "__main__":
    main()
