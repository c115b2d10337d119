"""How many tenants' adapters a card holds for a 7-8B model: the sizing table of docs/scaling.md,
from the residency planner's own arithmetic (appliance/adapters/residency.py), so the two agree.

    python benchmarks/sizing.py

Llama-3-8B's shape (hidden 4096, 32 layers, 8 KV heads of 128, MLP 14336, vocabulary 128256), bf16
weights and adapters, gpu_memory_utilization 0.9. The planner gives adapter slots half the VRAM
left after the weights; vLLM's KV cache gets the other half (what this prints as tokens in flight).
"""

from __future__ import annotations

from appliance.adapters.drops import BaseModelInfo
from appliance.adapters.residency import lora_budget_bytes, plan, slot_bytes

GIB = 1 << 30
HIDDEN, LAYERS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 4096, 32, 8, 128, 14336, 128256
DTYPE_BYTES = 2  # bf16
UTILIZATION = 0.90
CARDS = {"RTX 4090 (24 GB)": 24, "RTX A6000 (48 GB)": 48, "A100 / H100 (80 GB)": 80}
RANKS = (8, 16, 64)
ADAPTERS = 1000  # registered tenants: the slots asked for, beyond what any card holds
REQUEST_TOKENS = 2048  # prompt + completion of a typical chat request


def llama3_8b() -> tuple[BaseModelInfo, int]:
    """The linear layers' shapes (out, in) and the weights' bytes."""
    kv = KV_HEADS * HEAD_DIM
    per_layer = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (MLP, HIDDEN),
        "mlp.up_proj": (MLP, HIDDEN),
        "mlp.down_proj": (HIDDEN, MLP),
    }
    shapes = {f"model.layers.{i}.{name}": shape for i in range(LAYERS) for name, shape in per_layer.items()}
    shapes["lm_head"] = (VOCAB, HIDDEN)
    parameters = sum(o * i for o, i in shapes.values()) + VOCAB * HIDDEN + LAYERS * 2 * HIDDEN + HIDDEN
    return BaseModelInfo(shapes), parameters * DTYPE_BYTES


def main() -> None:
    base, weights = llama3_8b()
    kv_per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES
    print(
        f"Llama-3-8B: weights {weights / GIB:.1f} GiB (bf16); KV cache {kv_per_token // 1024} KiB per token"
    )
    print(
        "adapter slot (every linear layer, bf16): "
        + ", ".join(f"rank {r}: {slot_bytes(base, r, DTYPE_BYTES) / (1 << 20):.0f} MiB" for r in RANKS)
    )
    print()
    print(
        "| card | LoRA budget | GPU slots at rank "
        + " / ".join(map(str, RANKS))
        + f" | KV cache: tokens in flight | {REQUEST_TOKENS}-token requests at once |"
    )
    print("|---|---|---|---|---|")
    for card, gib in CARDS.items():
        free = int(gib * GIB * UTILIZATION) - weights
        budget = lora_budget_bytes(gpu_free_bytes=free, cpu_budget_bytes=0)
        slots = [
            plan(
                adapters=ADAPTERS,
                pinned=0,
                base=base,
                max_rank=rank,
                dtype_bytes=DTYPE_BYTES,
                lora_budget_bytes=budget,
                configured_max_loras=None,
                configured_max_cpu_loras=None,
            ).max_loras
            for rank in RANKS
        ]
        kv_tokens = (free - budget) // kv_per_token
        print(
            f"| {card} | {budget / GIB:.1f} GiB | {' / '.join(map(str, slots))} | "
            f"{kv_tokens:,} | {kv_tokens // REQUEST_TOKENS} |"
        )


if __name__ == "__main__":
    main()
