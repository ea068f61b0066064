"""Dynamic (per-token) sparsity: training-free rules (oracle, CATS, TEAL, WINA) and their calibrated per-layer thresholds; the importance network (`headlab.engine.dynamic.ipn`) that predicts each token's FFN channels and heads from its hidden state and a 4-bit sketch of the layer's weights; per-prompt masks, their cache and the k-mask router (`prompt_mask`, `mask_cache`); applying any of them per call through hooks, what they save and cost; and batch-1 decoding that reads only each token's kept FFN channels and heads (`choosers`, `gathered`, `decode`). `methods` is the one dispatch the app and the CLI use; `inspect` captures per-token choices for display."""

from headlab.engine.dynamic.apply import SparsityMeter, SparsityReport, apply_rule
from headlab.engine.dynamic.calibrate import calibrate, calibrate_weights_skipped, calibration_ids
from headlab.engine.dynamic.choosers import CatsChooser, ChannelChoice, Chooser, FixedChooser, IPNChooser
from headlab.engine.dynamic.decode import Generation, decode_weight_bytes, dense_generate, sparse_generate
from headlab.engine.dynamic.gating import chooser_gates
from headlab.engine.dynamic.measure import DynamicPerplexity, dynamic_perplexity, measure_sparsity
from headlab.engine.dynamic.rules import RULES, Rule, Thresholds, ThresholdsError, get_rule
from headlab.engine.dynamic.store import load_thresholds, save_thresholds, weights_sha256

__all__ = [
    "RULES",
    "Rule",
    "Thresholds",
    "ThresholdsError",
    "get_rule",
    "apply_rule",
    "SparsityMeter",
    "SparsityReport",
    "calibrate",
    "calibrate_weights_skipped",
    "calibration_ids",
    "measure_sparsity",
    "dynamic_perplexity",
    "DynamicPerplexity",
    "save_thresholds",
    "load_thresholds",
    "weights_sha256",
    "Generation",
    "sparse_generate",
    "dense_generate",
    "decode_weight_bytes",
    "Chooser",
    "ChannelChoice",
    "CatsChooser",
    "FixedChooser",
    "IPNChooser",
    "chooser_gates",
]
