"""GGUF files for llama.cpp: the base model, tenant adapters, and merged exports.

layout.py (HF tensor → GGUF tensor, rows included), vocab.py (the tokenizer), model.py (a base model,
optionally with an adapter merged in), lora.py (PEFT LoRA → GGUF LoRA, cached), export.py (one
tenant's model as a self-contained GGUF, quantised by llama.cpp, plus an Ollama Modelfile).
"""
