"""The mcmoe.* GGUF keys our files carry, and the ODP defaults, in one table (docs/FORMAT.md documents
them; the engine reads the same names in cpp/runtime/mcmoe-moe.cpp). Writers (export), readers (report,
inspect) and the load-time overrides (odp) all name keys from here."""
from __future__ import annotations

VERSION = "mcmoe.version"                 # uint32, 1
EXPERT_BITS = "mcmoe.expert_bits"         # uint array, layer-major, E per layer
EXPERT_BPW = "mcmoe.expert_bpw"           # float32, real bits per expert weight (scales included)
FILE_BPW = "mcmoe.file_bpw"               # float32, all tensors
CALIBRATION = "mcmoe.calibration"         # string, what PMQ calibrated on
PMQ_PREFIX = "mcmoe.pmq."                 # budget, scope, strategy, method (strings); alpha, beta, gamma (float32)

ODP_ENABLED = "mcmoe.odp.enabled"         # bool
ODP_MU = "mcmoe.odp.mu"                   # float32 array, one threshold per layer (calibrated)
ODP_MU_SCALE = "mcmoe.odp.mu_scale"       # float32
ODP_PROTECT = "mcmoe.odp.protect"         # float32, fraction of a prompt's tokens kept whole
ODP_IMPORTANCE = "mcmoe.odp.importance"   # string, one of IMPORTANCE_MODES
ODP_MU_OVERRIDE = "mcmoe.odp.mu_override"     # load-time only: one threshold for every layer
ODP_IF_CALIBRATED = "mcmoe.odp.if_calibrated"  # load-time only: prune only where the file has ODP_MU

# the engine's defaults where a file has no value (and what our converter writes)
ODP_DEFAULT_MU_SCALE = 1.0
ODP_DEFAULT_PROTECT = 0.02
ODP_DEFAULT_IMPORTANCE = "attn"
IMPORTANCE_MODES = ("attn", "rowsum", "norm", "none")
