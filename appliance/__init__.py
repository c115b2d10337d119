"""lorabox: one base model, one LoRA adapter per tenant, an OpenAI-compatible API."""

__version__ = "0.1.0"
