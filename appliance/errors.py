"""User-facing errors. They become CLI messages or HTTP error bodies only at those edges."""


class LoraboxError(Exception):
    """Base class for errors lorabox reports to a person."""


class ConfigError(LoraboxError):
    """The settings file or environment is wrong."""


class StoreError(LoraboxError):
    """A tenant, key or adapter operation cannot be done as asked."""


class AdapterError(LoraboxError):
    """An adapter folder is not a servable PEFT LoRA adapter; the message says why."""


class EngineUnavailable(LoraboxError):
    """No inference engine can run here; the message says why."""


class EngineDead(LoraboxError):
    """The engine can no longer serve (its process died or it stopped answering); the daemon exits."""


class ConversionError(LoraboxError):
    """A model cannot be written as GGUF (unsupported architecture or tokenizer); the message says why."""


class PolicyError(LoraboxError):
    """A tenant policy value that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StoreUnavailable(LoraboxError):
    """The state database cannot take a write now: another program holds its write lock (`busy`:
    retrying soon will do), or the disk is full, read-only or failing. The message says which."""

    def __init__(self, message: str, *, busy: bool):
        super().__init__(message)
        self.busy = busy
