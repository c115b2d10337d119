"""Test and benchmark helpers (HF+PEFT reference, a `lorabox serve` child); the daemon never uses them."""
