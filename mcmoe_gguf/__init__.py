"""mcmoe-gguf: Mixture-of-Experts checkpoints -> per-expert mixed-bit GGUF for a patched llama.cpp."""
from .runtime import RuntimeMismatch, check_runtime, load

__all__ = ["load", "check_runtime", "RuntimeMismatch"]
