"""Every name this app keeps in `st.session_state`, in one place so pages never collide.

Values under these keys belong to one browser session. Keys starting with `w.` are widget
keys; their defaults are set with `ui.session.widget_default` (never through a widget's own
default argument), because app.py re-assigns the WIDGETS_TO_KEEP on every run so that a
page's settings survive a visit to another page.
"""

from __future__ import annotations

__all__ = [
    "MODEL_CHOICE", "MODEL_FAILED", "MASK", "MASK_VERSION", "PREFIX_CACHE", "MASK_UPLOAD_ERROR",
    "W_MODEL_OPTION", "W_MODEL_PATH", "W_DEVICE", "W_DTYPE", "W_TRUST_REMOTE_CODE", "W_CALIBRATION",
    "W_CALIBRATION_TEXTS", "W_MASK_UPLOAD", "W_HEADS_RANK_BY", "W_HEADS_COLOUR", "W_ATTN_PROMPT", "W_ATTN_LAYER",
    "W_ATTN_HEAD",
    "W_ATTN_VIEW", "W_ATTN_BINS", "W_ATTN_REDUCE", "W_ATTN_WINDOW", "W_ATTN_POWER", "W_PRUNE_UNIT",
    "W_PRUNE_CRITERION", "W_PRUNE_BUDGET", "W_PRUNE_SCOPE", "W_PRUNE_KV", "W_GEN_PROMPT", "W_GEN_TOKENS",
    "WIDGETS_TO_KEEP",
]

# --- plain state (ui/session.py and ui/sidebar.py read and write these) ---------------------
MODEL_CHOICE = "headlab.model_choice"  # ui.models.ModelChoice the session has open
MODEL_FAILED = "headlab.model_failed"  # (ModelChoice, message) of the last choice that did not load
MASK = "headlab.mask"  # ui.session.MaskState: (model key, PruneMask)
MASK_VERSION = "headlab.mask_version"  # bumped on every mask change; clickable grids key on it
PREFIX_CACHE = "headlab.prefix_cache"  # (model key, engine.runtime.prefix_cache.PrefixCache)
MASK_UPLOAD_ERROR = "headlab.mask_upload_error"

# --- sidebar widgets (drawn by app.py on every page) ----------------------------------------
W_MODEL_OPTION = "w.model_option"
W_MODEL_PATH = "w.model_path"
W_DEVICE = "w.device"
W_DTYPE = "w.dtype"
W_TRUST_REMOTE_CODE = "w.trust_remote_code"
W_CALIBRATION = "w.calibration"
W_CALIBRATION_TEXTS = "w.calibration_texts"
W_MASK_UPLOAD = "w.mask_upload"

# --- page widgets ------------------------------------------------------------------------------
W_HEADS_RANK_BY = "w.heads.rank_by"
W_HEADS_COLOUR = "w.heads.colour"  # "rank" or "value"
W_ATTN_PROMPT = "w.attention.prompt"
W_ATTN_LAYER = "w.attention.layer"
W_ATTN_HEAD = "w.attention.head"  # "all" or a head index
W_ATTN_VIEW = "w.attention.view"
W_ATTN_BINS = "w.attention.bins"
W_ATTN_REDUCE = "w.attention.reduce"
W_ATTN_WINDOW = "w.attention.window"  # (start, stop) token range
W_ATTN_POWER = "w.attention.power"
W_PRUNE_UNIT = "w.prune.unit"
W_PRUNE_CRITERION = "w.prune.criterion"
W_PRUNE_BUDGET = "w.prune.budget"
W_PRUNE_SCOPE = "w.prune.scope"
W_PRUNE_KV = "w.prune.kv_groups"
W_GEN_PROMPT = "w.prune.prompt"
W_GEN_TOKENS = "w.prune.max_new_tokens"

# Page settings that must survive a visit to another page (Streamlit drops the state of
# widgets a run does not draw; app.py re-assigns these on every run, the documented way).
WIDGETS_TO_KEEP = (
    W_HEADS_RANK_BY, W_HEADS_COLOUR, W_ATTN_PROMPT, W_ATTN_LAYER, W_ATTN_HEAD, W_ATTN_VIEW, W_ATTN_BINS, W_ATTN_REDUCE,
    W_ATTN_WINDOW, W_ATTN_POWER, W_PRUNE_UNIT, W_PRUNE_CRITERION, W_PRUNE_BUDGET, W_PRUNE_SCOPE, W_PRUNE_KV,
    W_GEN_PROMPT, W_GEN_TOKENS,
)
