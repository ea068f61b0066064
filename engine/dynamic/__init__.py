"""Dynamic (per-token) sparsity: training-free rules (oracle, CATS, TEAL, WINA), their calibrated per-layer thresholds, applying them per call through hooks, what they save and cost, and batch-1 decoding that reads only each token's kept FFN channels and heads."""

from engine.dynamic.apply import SparsityMeter, SparsityReport, apply_rule
from engine.dynamic.calibrate import calibrate, calibration_ids
from engine.dynamic.choosers import CatsChooser, ChannelChoice, Chooser, FixedChooser, IPNChooser
from engine.dynamic.decode import Generation, decode_weight_bytes, dense_generate, sparse_generate
from engine.dynamic.gating import chooser_gates
from engine.dynamic.measure import DynamicPerplexity, dynamic_perplexity, measure_sparsity
from engine.dynamic.rules import RULES, Rule, Thresholds, ThresholdsError, get_rule
from engine.dynamic.store import load_thresholds, save_thresholds, weights_sha256

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
