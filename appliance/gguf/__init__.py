"""GGUF files for llama.cpp: the base model, tenant adapters, and merged exports.

layout.py (HF tensor → GGUF tensor, rows included), vocab.py (the tokenizer), model.py (a base model,
optionally with an adapter merged in), lora.py (PEFT LoRA → GGUF LoRA, cached), export.py (one
tenant's model as a self-contained GGUF, quantised by llama.cpp, plus an Ollama Modelfile).
"""

# What `lorabox export --quant` offers: float types lorabox writes, then llama.cpp's quantised ones.
# Here, not in export.py, so that the CLI can list them without importing the converters.
EXPORT_QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
