"""The importance prediction network: per token and layer, which FFN channels and heads to keep, learned end to end.

network.py  the IPN (scores from the input and a 4-bit sketch of the layer's weights, learned thresholds)
apply.py    run the shared model under its masks for one call (hooks), straight-through for training
calibrate.py thresholds from data: per layer to a target (the untrained network), one shift to an exact average;
             the oracle at the network's per-layer budgets
train.py    KL to the dense model + sparsity + consistency, model frozen
evaluate.py perplexity under the network (the rules' evaluation loop)
agreement.py recall / precision against the oracle, per layer
store.py    safetensors + JSON on disk, refused for another model
"""

from headlab.engine.dynamic.ipn.agreement import LayerAgreement, oracle_agreement
from headlab.engine.dynamic.ipn.apply import RULE_NAME, IPNTrace, apply_ipn
from headlab.engine.dynamic.ipn.calibrate import (
    calibrate_thresholds,
    ffn_sparsity,
    layer_keep_counts,
    match_sparsity,
    oracle_at_budgets,
    untrained_ipn,
    weights_skipped,
)
from headlab.engine.dynamic.ipn.evaluate import ipn_perplexity
from headlab.engine.dynamic.ipn.network import IPN, IPNError, layer_sketches
from headlab.engine.dynamic.ipn.store import load_ipn, save_ipn
from headlab.engine.dynamic.ipn.train import IPNConfig, IPNTraining, train_ipn, training_key

__all__ = [
    "IPN",
    "RULE_NAME",
    "IPNConfig",
    "IPNError",
    "IPNTrace",
    "IPNTraining",
    "LayerAgreement",
    "apply_ipn",
    "calibrate_thresholds",
    "ffn_sparsity",
    "ipn_perplexity",
    "layer_keep_counts",
    "layer_sketches",
    "load_ipn",
    "match_sparsity",
    "oracle_agreement",
    "oracle_at_budgets",
    "save_ipn",
    "train_ipn",
    "training_key",
    "untrained_ipn",
    "weights_skipped",
]
