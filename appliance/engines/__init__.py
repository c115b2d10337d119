"""Inference engines behind one protocol (`base.Engine`): vLLM first, llama.cpp as fallback."""
