"""Every name this app keeps in `st.session_state`, in one place so pages never collide.

Values under these keys belong to one browser session. `W_*` names are widget keys, `FORM_*`
form keys and `CHART_*` keys of charts; one commented "prefix" is completed by the page
(`f"{W_HEADS_GRID}.{criterion}"`) to tell its instances apart. Widgets in
WIDGETS_TO_KEEP get their defaults from `headlab.ui.session.widget_default` (never through the
widget's own default argument), because app.py re-assigns them on every run so that a page's
settings survive a visit to another page; other widgets may pass their own defaults. Tests
address widgets by these string values.
"""

from __future__ import annotations

__all__ = [
    "MODEL_CHOICE", "MODEL_FAILED", "MASK", "PREFIX_CACHE", "MASK_UPLOAD_ERROR",
    "W_MODEL_OPTION", "W_MODEL_PATH", "W_DEVICE", "W_DTYPE", "W_TRUST_REMOTE_CODE", "W_CALIBRATION",
    "W_CALIBRATION_TEXTS", "W_MASK_UPLOAD", "W_HEADS_RANK_BY", "W_HEADS_COLOUR", "W_ATTN_PROMPT", "W_ATTN_LAYER",
    "W_ATTN_HEAD",
    "W_ATTN_VIEW", "W_ATTN_BINS", "W_ATTN_REDUCE", "W_ATTN_WINDOW", "W_ATTN_POWER", "W_PRUNE_UNIT",
    "W_PRUNE_CRITERION", "W_PRUNE_BUDGET", "W_PRUNE_SCOPE", "W_PRUNE_KV", "W_GEN_PROMPT", "W_GEN_TOKENS",
    "W_HEADS_GRID", "W_HEADS_TABLE", "FORM_HEADS_TOGGLE", "W_PRUNE_GRID", "CHART_PRUNE_CURVE",
    "SUGGESTION", "SUGGEST_JOB", "W_SUGGEST_BUDGET", "W_SUGGEST_MODE", "W_SUGGEST_METHOD", "W_SUGGEST_TARGET",
    "W_SUGGEST_PARAMS",
    "W_SUGGEST_SIZE_BUTTON",
    "EXPORT_RESULT", "W_EXPORT_KEEP", "W_EXPORT_ROUTE", "W_EXPORT_CRITERION", "W_EXPORT_LAYOUT", "W_EXPORT_FOLDER",
    "W_EXPORT_OVERWRITE", "W_EXPORT_EVALUATE", "W_EXPORT_FORMAT", "W_EXPORT_GGUF_TYPE",
    "DISTILL_JOB", "W_DISTILL_SOURCE", "W_DISTILL_KEEP", "W_DISTILL_RECIPE", "W_DISTILL_BITS", "W_DISTILL_MODE",
    "W_DISTILL_STEPS", "W_DISTILL_LR", "W_DISTILL_TEXT", "W_DISTILL_FOLDER", "CHART_DISTILL_HISTORY",
    "W_DISTILL_BY_TIME", "W_DISTILL_MINUTES",
    "CLUSTERS_ROUTER", "CLUSTERS_UMAP_POLLING", "W_CLUSTERS_K", "W_CLUSTERS_PER_SOURCE", "W_CLUSTERS_COLOUR",
    "W_CLUSTERS_REMOVED", "W_CLUSTERS_STEPS", "W_CLUSTERS_PROMPT", "W_CLUSTERS_HISTORY", "FORM_CLUSTERS_TRAIN",
    "W_CLUSTERS_ENCODER", "W_CLUSTERS_ENCODER_PATH",
    "CHART_CLUSTERS_SCATTER", "CHART_CLUSTERS_LIVE", "CHART_CLUSTERS_MASKS", "CHART_CLUSTERS_CURVE",
    "CHART_CLUSTERS_GATES",
    "DYN_TRAINING", "DYN_LOADED", "DYN_GENERATE", "W_DYN_METHOD", "W_DYN_TARGET", "W_DYN_FOLDER", "W_DYN_PROMPT",
    "W_DYN_TOKEN", "W_DYN_LAYER", "W_DYN_NEW_TOKENS", "W_DYN_PRECISION", "W_DYN_STEPS", "W_DYN_HEADS",
    "W_DYN_SAVE_FOLDER",
    "FORM_DYN_TRAIN", "CHART_DYN_MAP", "CHART_DYN_HEADS_MAP", "CHART_DYN_CELL", "CHART_DYN_UNITS", "CHART_DYN_TRAINING",
    "CHART_DYN_LAYERS", "CHART_DYN_QUALITY", "CHART_DYN_BENCH_LAYERS", "W_DYN_BENCH_TARGET",
    "WIDGETS_TO_KEEP",
]

# --- plain state (headlab/ui/session.py and headlab/ui/sidebar.py read and write these) ---------------------
MODEL_CHOICE = "headlab.model_choice"  # headlab.ui.models.ModelChoice the session has open
MODEL_FAILED = "headlab.model_failed"  # (ModelChoice, message) of the last choice that did not load
MASK = "headlab.mask"  # headlab.ui.session.MaskState: model key, mask, version, click acknowledgements
PREFIX_CACHE = "headlab.prefix_cache"  # (model key, headlab.engine.runtime.prefix_cache.PrefixCache)
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
W_HEADS_GRID = "heads.grid"  # prefix: one clickable grid per criterion (headlab/ui/head_grid.py)
W_HEADS_TABLE = "heads.table"  # prefix: the table's selection starts afresh with each mask version
FORM_HEADS_TOGGLE = "heads.toggle"  # headlab.ui.widgets.toggle_form adds ".layer" and ".head"
W_PRUNE_GRID = "prune.grid"
CHART_PRUNE_CURVE = "prune.curve"

# --- the Prune page's suggest panel (headlab/ui/suggest.py) -------------------------------------------
SUGGESTION = "suggest.last"  # (model key, mask, Suggestion) of this session's last suggestion
SUGGEST_JOB = "suggest.job"  # (board, job key) of the suggestion job this session started last (headlab.ui.jobs)
W_SUGGEST_BUDGET = "suggest.budget"
W_SUGGEST_MODE = "suggest.mode"
W_SUGGEST_METHOD = "suggest.method"
W_SUGGEST_TARGET = "suggest.target"  # heads, or a parameter budget by width / by depth
W_SUGGEST_PARAMS = "suggest.params"  # fraction of the parameters to remove
W_SUGGEST_SIZE_BUTTON = "suggest.size_button"

# --- Export page ---------------------------------------------------------------------------------
EXPORT_RESULT = "headlab.export.result"  # this session's last ExportResult or GgufExportResult
W_EXPORT_KEEP = "w.export.keep"
W_EXPORT_ROUTE = "w.export.route"
W_EXPORT_CRITERION = "w.export.criterion"  # prefix: one selectbox per route
W_EXPORT_LAYOUT = "w.export.layout"
W_EXPORT_FOLDER = "w.export.folder"
W_EXPORT_OVERWRITE = "w.export.overwrite"
W_EXPORT_EVALUATE = "w.export.evaluate"
W_EXPORT_FORMAT = "w.export.format"  # a Hugging Face folder or a GGUF file for llama.cpp / Ollama
W_EXPORT_GGUF_TYPE = "w.export.gguf_type"

# --- Distill page --------------------------------------------------------------------------------
DISTILL_JOB = "distill.job"  # this session's headlab.engine.recovery.recipes.RecoveryJob
W_DISTILL_SOURCE = "distill.source"
W_DISTILL_KEEP = "distill.keep"
W_DISTILL_RECIPE = "distill.recipe"
W_DISTILL_BITS = "distill.bits"
W_DISTILL_MODE = "distill.mode"
W_DISTILL_STEPS = "distill.steps"
W_DISTILL_BY_TIME = "distill.by_time"
W_DISTILL_MINUTES = "distill.minutes"
W_DISTILL_LR = "distill.lr"
W_DISTILL_TEXT = "distill.text"
W_DISTILL_FOLDER = "distill.folder"
CHART_DISTILL_HISTORY = "distill.chart"

# --- Clusters page (pages/clusters.py, headlab/ui/clusters.py) -------------------------------------------
CLUSTERS_ROUTER = "headlab.clusters.router"  # (model key, encoder identity, k, per_source, Router, {mask: [StepLog]})
CLUSTERS_UMAP_POLLING = "headlab.clusters.umap_polling"  # this session's map is waiting for a background UMAP
W_CLUSTERS_K = "w.clusters.k"
W_CLUSTERS_PER_SOURCE = "w.clusters.per_source"
W_CLUSTERS_COLOUR = "w.clusters.colour"
W_CLUSTERS_REMOVED = "w.clusters.removed"
W_CLUSTERS_STEPS = "w.clusters.steps"
W_CLUSTERS_PROMPT = "w.clusters.prompt"
W_CLUSTERS_HISTORY = "w.clusters.history"
W_CLUSTERS_ENCODER = "w.clusters.encoder"  # the shipped MiniLM or OTHER_ENCODER (headlab/ui/clusters.py)
W_CLUSTERS_ENCODER_PATH = "w.clusters.encoder_path"
FORM_CLUSTERS_TRAIN = "clusters.train"
CHART_CLUSTERS_SCATTER = "clusters.scatter"
CHART_CLUSTERS_LIVE = "clusters.live"  # prefix: a new chart per training step drawn
CHART_CLUSTERS_MASKS = "clusters.masks"
CHART_CLUSTERS_CURVE = "clusters.curve"
CHART_CLUSTERS_GATES = "clusters.gates"

# --- Dynamic page (pages/dynamic.py, headlab/ui/dynamic.py) -----------------------------------------------
DYN_TRAINING = "headlab.dynamic.training"  # headlab.ui.dynamic.TrainingRun: this session's IPN training job
DYN_LOADED = "headlab.dynamic.loaded"  # (model key, folder, method, cache name) loaded from a folder
DYN_GENERATE = "headlab.dynamic.generate"  # (model key, method key, prompt, new tokens, precision) last asked
W_DYN_METHOD = "w.dynamic.method"
W_DYN_TARGET = "w.dynamic.target"
W_DYN_FOLDER = "w.dynamic.folder"
W_DYN_PROMPT = "w.dynamic.prompt"
W_DYN_TOKEN = "w.dynamic.token"  # the inspected cell: token ...
W_DYN_LAYER = "w.dynamic.layer"  # ... and layer (set by a click on the map too)
W_DYN_NEW_TOKENS = "w.dynamic.new_tokens"
W_DYN_PRECISION = "w.dynamic.precision"  # the decode's FFN weights: float32 or int4
W_DYN_STEPS = "w.dynamic.steps"
W_DYN_HEADS = "w.dynamic.heads"
W_DYN_SAVE_FOLDER = "w.dynamic.save_folder"
FORM_DYN_TRAIN = "dynamic.train"
CHART_DYN_MAP = "dynamic.map"  # its selection (a clicked cell) is read by the page
CHART_DYN_HEADS_MAP = "dynamic.heads_map"
CHART_DYN_CELL = "dynamic.cell"
CHART_DYN_UNITS = "dynamic.units"
CHART_DYN_TRAINING = "dynamic.training"
CHART_DYN_LAYERS = "dynamic.layers"
CHART_DYN_QUALITY = "dynamic.quality"
CHART_DYN_BENCH_LAYERS = "dynamic.bench_layers"  # kept FFN channels per layer, from the benchmark file
W_DYN_BENCH_TARGET = "w.dynamic.bench_target"  # the target sparsity that chart shows

# Attention and Diagnostics on long prompts
ATTN_LAYER_INPUTS = "attention.layer_inputs"  # this session's LayerInputCache (layer inputs of recent prompts)
FORM_DIAG_LONG_PROMPT = "diagnostics.prompt"
W_DIAG_LONG_PROMPT = "w.diagnostics.prompt"
DIAG_LONG_PROMPT_RESULT = "diagnostics.prompt.result"  # (model key, PromptDiagnosis) of the last long prompt

# Page settings that must survive a visit to another page (Streamlit drops the state of
# widgets a run does not draw; app.py re-assigns these on every run, the documented way).
WIDGETS_TO_KEEP = (
    W_HEADS_RANK_BY, W_HEADS_COLOUR, W_ATTN_PROMPT, W_ATTN_LAYER, W_ATTN_HEAD, W_ATTN_VIEW, W_ATTN_BINS, W_ATTN_REDUCE,
    W_ATTN_WINDOW, W_ATTN_POWER, W_PRUNE_UNIT, W_PRUNE_CRITERION, W_PRUNE_BUDGET, W_PRUNE_SCOPE, W_PRUNE_KV,
    W_GEN_PROMPT, W_GEN_TOKENS, W_DYN_METHOD, W_DYN_TARGET, W_DYN_PROMPT, W_DYN_NEW_TOKENS,
    W_DYN_PRECISION,
)
