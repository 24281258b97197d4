"""mcmoe-gguf: Mixture-of-Experts checkpoints -> per-expert mixed-bit GGUF for a patched llama.cpp."""
from mcmoe_gguf.engine.odp import odp_reset, odp_stats
from mcmoe_gguf.engine.runtime import RuntimeMismatch, check_runtime, load

__all__ = ["load", "odp_stats", "odp_reset", "check_runtime", "RuntimeMismatch"]
