"""The Dynamic page's pieces: methods calibrated once for every session, their results, training, benchmarks.

Shared by every session (headlab.ui.shared_cache: computed once in a worker, the asking session draws the
progress; a rerun ends the wait, never the work), keyed by model + method + target:
calibrated rules and untrained importance networks, live perplexities, token maps, generations.
A method trained in this session or loaded from a folder is this session's own (st.session_state)
and is keyed by a name drawn once for it. The training runs in an headlab.engine.core.jobs.Job that no
rerun cancels; the page polls it. Nothing here changes the shared model: every method runs
through headlab.engine.dynamic's thread-scoped hooks.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.jobs import Job
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import context_length
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.inspect import TokenMap, inspect_tokens
from headlab.engine.dynamic.ipn import IPN, IPNConfig, IPNTraining, LayerAgreement, oracle_agreement, train_ipn
from headlab.engine.dynamic.measure import DynamicPerplexity
from headlab.engine.dynamic.methods import (
    PRECISIONS,
    DynamicMethod,
    SideBySide,
    calibrated,
    load_method,
    method_label,
    method_perplexity,
    prompt_room,
    side_by_side,
)
from headlab.engine.dynamic.rotation import weight_grid
from headlab.engine.runtime.evaluate import eval_windows, prompt_ids
from headlab.engine.runtime.prefix_cache import live_protocol
from headlab.ui import keys
from headlab.ui.pages import APP_ROOT
from headlab.ui.shared_cache import shared_cache

__all__ = [
    "BENCH_COMMANDS",
    "BENCH_DECODE",
    "BENCH_LAYERS",
    "BENCH_QUALITY",
    "CALIBRATED",
    "FOLDER",
    "MAP_TOKENS",
    "METHOD_LABELS",
    "PRECISIONS",
    "TRAINED",
    "Chosen",
    "TrainedIPN",
    "TrainingRun",
    "bench_layers",
    "bench_points",
    "bench_source",
    "chosen_method",
    "generation",
    "known_generation",
    "live_perplexity",
    "load_folder",
    "loaded",
    "start_training",
    "token_map",
    "training",
    "weight_grid_note",
]

#: Set to the slider's target without training.
CALIBRATED = ("oracle", "exact", "cats", "teal", "wina", "teal-ffn", "wina-ffn", "ipn")
TRAINED, FOLDER = "trained", "folder"
METHOD_LABELS = {
    "oracle": "Oracle top-k (the true top channels, exactly k per token in every layer)",
    "exact": "Exact score |act(gate) * up|, threshold per layer (the count varies per token)",
    "cats": "CATS (Lee et al. 2024): |act(gate)| threshold",
    "teal": "TEAL (Liu et al. 2024): |input| of every matrix",
    "wina": "WINA (Chen et al. 2025): |input| x column norm",
    "teal-ffn": "TEAL on the FFN only: |input| of gate, up and down",
    "wina-ffn": "WINA on the FFN only: |input| x column norm, gate, up and down",
    "ipn": "IPN, untrained (oracle score on a 4-bit sketch of the rotated weights)",
    TRAINED: "IPN trained in this session",
    FOLDER: "Thresholds or IPN from a folder",
}
MAP_TOKENS = 64  # tokens shown in the map: each keeps [layers, FFN channels] of scores in the shared cache
CALIBRATION_WINDOWS = 8

BENCH_QUALITY = APP_ROOT / "bench" / "results" / "dynamic.csv"
BENCH_DECODE = APP_ROOT / "bench" / "results" / "dynamic_decode.csv"
BENCH_LAYERS = APP_ROOT / "bench" / "results" / "dynamic_layers.csv"
#: What writes each results file (by file name).
BENCH_COMMANDS = {BENCH_QUALITY.name: "python bench/bench_dynamic.py",
                  BENCH_DECODE.name: "python bench/bench_dynamic_decode.py --threads 1",
                  BENCH_LAYERS.name: "python bench/bench_dynamic.py"}
LAYER_COLUMNS = ("method", "target", "layer", "ffn_dim", "kept_mean", "kept_p10", "kept_p90")


@dataclass(frozen=True)
class Chosen:
    """The method the page runs, the key its results are cached under, and its label."""

    method: DynamicMethod
    key: str
    label: str


def calibration_windows(handle: ModelHandle) -> torch.Tensor:
    """The calibration windows for the open model: 8 x 256 tokens (shorter when its context is)."""
    return calibration_ids(handle, window=min(256, context_length(handle.model)), n_windows=CALIBRATION_WINDOWS)


def _calibrate(handle: ModelHandle, name: str, target: float, report: Progress) -> DynamicMethod:
    report(0, 1)  # a total from the start: the waiting session redraws (and can be stopped) every second
    method = calibrated(handle, name, target, calibration_windows(handle))
    report(1, 1)
    return method


def chosen_method(handle: ModelHandle, model_key: str, choice: str, target: float,
                  progress: Progress | None = None) -> Chosen | None:
    """The method `choice` (a CALIBRATED name at `target`, TRAINED or FOLDER), or None when there is none yet."""
    if choice in CALIBRATED:
        key = f"{choice}|{target:.2f}"
        method = shared_cache("dynamic_methods", 64).get_or_compute(
            f"{model_key}|{key}", lambda report: _calibrate(handle, choice, target, report), progress)
        return Chosen(method, key, method_label(method))
    if choice == TRAINED:
        run = training(model_key)
        result = run.result if run is not None else None
        return None if result is None else Chosen(result.ipn, f"trained|{run.uid}", f"IPN trained here, "
                                                  f"{result.ipn.target:.0%}")
    state = loaded(model_key)
    return None if state is None else Chosen(state[2], f"folder|{state[0]}", f"{method_label(state[2])} from "
                                                                             f"{state[1]}")


def weight_grid_note(handle: ModelHandle, model_key: str) -> str | None:
    """What the page says about the open model's weights and the IPN's sketch (headlab.engine.dynamic.rotation's
    WeightGrid.note: measured once per model, for every session)."""
    grid = shared_cache("dynamic_weight_grid", 8).get_or_compute(model_key, lambda report: weight_grid(handle))
    return grid.note()


def live_perplexity(handle: ModelHandle, model_key: str, chosen: Chosen, progress: Progress) -> DynamicPerplexity:
    """Perplexity under the method on the live protocol (the one of the other pages), with its sparsity."""
    protocol = live_protocol(handle)
    return shared_cache("dynamic_perplexity", 128).get_or_compute(
        f"{model_key}|{chosen.key}|{protocol}",
        lambda report: method_perplexity(handle, chosen.method, protocol, progress=report), progress)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def token_map(handle: ModelHandle, model_key: str, chosen: Chosen, prompt: str, progress: Progress) -> TokenMap:
    """The method's per-token choices on the first MAP_TOKENS tokens of `prompt` (no chat template)."""
    ids = prompt_ids(handle, prompt, chat=False)[:, :MAP_TOKENS]

    def compute(report: Progress) -> TokenMap:
        report(0, 1)
        return inspect_tokens(handle, chosen.method, ids)

    return shared_cache("dynamic_token_maps", 8).get_or_compute(f"{model_key}|{chosen.key}|{_digest(prompt)}",
                                                                compute, progress)


def _generation_key(model_key: str, chosen: Chosen, prompt: str, max_new_tokens: int, precision: str) -> str:
    return f"{model_key}|{chosen.key}|{_digest(prompt)}|{max_new_tokens}|{precision}"


def generation(handle: ModelHandle, model_key: str, chosen: Chosen, prompt: str, max_new_tokens: int,
               progress: Progress, precision: str = "float32") -> SideBySide:
    """Dense and dynamic greedy continuations of `prompt` (chat template), each timed (computed once).

    precision "int4": both read the FFN at 4 bits (importance networks only; see methods.side_by_side)."""
    ids = prompt_room(handle, prompt, max_new_tokens)

    def compute(report: Progress) -> SideBySide:
        report(0, 1)
        return side_by_side(handle, chosen.method, ids, max_new_tokens, precision)

    return shared_cache("dynamic_generations", 32).get_or_compute(
        _generation_key(model_key, chosen, prompt, max_new_tokens, precision), compute, progress)


def known_generation(model_key: str, chosen: Chosen, prompt: str, max_new_tokens: int,
                     precision: str = "float32") -> SideBySide | None:
    """The generation of these settings if some session already made it, else None."""
    return shared_cache("dynamic_generations", 32).get(
        _generation_key(model_key, chosen, prompt, max_new_tokens, precision))


# --- training (this session's) ------------------------------------------------------------------

@dataclass(frozen=True)
class TrainedIPN:
    """A finished training: the network, its run, and its per-layer agreement with the oracle on held-out text."""

    run: IPNTraining
    agreement: list[LayerAgreement]

    @property
    def ipn(self) -> IPN:
        return self.run.ipn


@dataclass(frozen=True)
class TrainingRun:
    """This session's training job for one model: its settings, and the job (history so far = job.partial)."""

    model_key: str
    uid: str
    config: IPNConfig
    job: Job

    @property
    def history(self) -> list[dict]:
        return list(self.job.partial or [])

    @property
    def result(self) -> TrainedIPN | None:
        return self.job.result if self.job.finished else None


def _train(handle: ModelHandle, config: IPNConfig, job: Job) -> TrainedIPN:
    history: list[dict] = []

    def on_step(entry: dict) -> None:
        history.append(entry)
        job.report(entry["step"], config.steps, list(history))
        last = entry["step"] == config.steps or job.cancel_requested()
        job.set_stage("Shifting the thresholds to the exact target sparsity" if last else "Training")

    job.set_stage("The dense model's outputs on the calibration windows")
    ids = calibration_ids(handle, window=config.window, n_windows=config.n_windows)
    run = train_ipn(handle, config, ids, on_step=on_step, should_stop=job.cancel_requested)
    job.set_stage("Recall and precision against the oracle on held-out text")
    windows, _ = eval_windows(handle, live_protocol(handle))
    return TrainedIPN(run, oracle_agreement(handle, run.ipn, windows))


def training(model_key: str) -> TrainingRun | None:
    """This session's training run for the open model (running or finished), or None."""
    run: TrainingRun | None = st.session_state.get(keys.DYN_TRAINING)
    return run if run is not None and run.model_key == model_key else None


def start_training(handle: ModelHandle, model_key: str, target: float, steps: int, heads: bool) -> TrainingRun:
    """Start training an IPN in a background job (a rerun does not stop it) and keep it in this session."""
    window = min(256, context_length(handle.model))
    config = IPNConfig(target=target, heads=heads, steps=steps, window=window, n_windows=CALIBRATION_WINDOWS)
    job: Job = Job(lambda j: _train(handle, config, j), name="ipn-training")
    run = TrainingRun(model_key, uuid.uuid4().hex[:12], config, job)
    st.session_state[keys.DYN_TRAINING] = run
    job.start()
    return run


# --- a method from a folder (this session's) ------------------------------------------------------

def load_folder(handle: ModelHandle, model_key: str, folder: str) -> DynamicMethod:
    """Load thresholds or an IPN from `folder` for the open model (refused for another) into this session."""
    method = load_method(handle, folder)
    st.session_state[keys.DYN_LOADED] = (model_key, folder, method, uuid.uuid4().hex[:12])
    return method


def loaded(model_key: str) -> tuple[str, str, DynamicMethod] | None:
    """(cache name, folder, method) this session loaded for the open model, or None."""
    state = st.session_state.get(keys.DYN_LOADED)
    if state is None or state[0] != model_key:
        return None
    return state[3], state[1], state[2]


# --- benchmark figures ------------------------------------------------------------------------------

def bench_source(path: Path) -> str:
    """`file` (`the command that writes it`), the file relative to the app's folder when inside it."""
    shown = path.relative_to(APP_ROOT) if path.is_relative_to(APP_ROOT) else path
    return f"`{shown}` (`{BENCH_COMMANDS.get(path.name, 'its benchmark')}`)"


def _decode_method(config: object) -> str:
    """A decode-benchmark row's method: "cats 50%" -> cats, "ipn untrained 50%" -> ipn-untrained, a saved network
    folder with heads ("ipn 0.50-head_target0.25-headsTrue") -> ipn+heads, "ipn x" -> ipn."""
    words = [w for w in str(config).lower().split() if not w.endswith("%")]
    if words[:2] == ["ipn", "untrained"]:
        return "ipn-untrained"
    if words[:1] == ["ipn"] and "headstrue" in str(config).lower():  # a saved network with heads: ipn+heads
        return "ipn+heads"
    return words[0] if words else ""


def _numbers(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """The `columns` (name in df -> name here) of df as numbers, rows with a missing value dropped."""
    return pd.DataFrame({new: pd.to_numeric(df[old], errors="coerce") for old, new in columns.items()})


def bench_layers(path: Path | None = None) -> tuple[pd.DataFrame | None, list[str]]:
    """(bench/bench_dynamic.py's kept channels per method, target and layer, or None; notes on what is missing)."""
    path = path or BENCH_LAYERS
    if not path.is_file():
        return None, [f"{bench_source(path)} is absent"]
    raw = pd.read_csv(path)
    missing = [c for c in LAYER_COLUMNS if c not in raw.columns]
    if missing:
        return None, [f"{bench_source(path)} lacks its {', '.join(missing)} column(s)"]
    df = _numbers(raw, {c: c for c in LAYER_COLUMNS[1:]})
    df.insert(0, "method", raw["method"].astype(str))
    df = df.dropna()
    df["target"] = df["target"].round(3)
    return (df if len(df) else None), ([] if len(df) else [f"{bench_source(path)} has no complete row"])


def bench_points(quality: Path | None = None, decode: Path | None = None
                 ) -> tuple[pd.DataFrame | None, float | None, list[str]]:
    """(points: method, target, perplexity, speedup, or None; the dense perplexity; notes on what is missing).

    `quality` is bench/bench_dynamic.py's CSV (method, target, ppl_main, ratio_main, ...), `decode`
    bench/bench_dynamic_decode.py's (config, target_sparsity, speedup, ...). A point needs both a
    perplexity and a measured decode speed-up at the same method and target; nothing is drawn from
    one file alone.
    """
    quality, decode = quality or BENCH_QUALITY, decode or BENCH_DECODE
    notes = [f"{bench_source(p)} is absent" for p in (quality, decode) if not p.is_file()]
    if notes:
        return None, None, notes
    q_raw, d_raw = pd.read_csv(quality), pd.read_csv(decode)
    missing = [f"{bench_source(p)} lacks its {', '.join(c for c in cols if c not in df.columns)} column(s)"
               for p, df, cols in ((quality, q_raw, ("method", "target", "ppl_main", "ratio_main")),
                                   (decode, d_raw, ("config", "target_sparsity", "speedup")))
               if not set(cols) <= set(df.columns)]
    if missing:
        return None, None, missing
    q = _numbers(q_raw, {"target": "target", "ppl_main": "perplexity", "ratio_main": "ratio"})
    q.insert(0, "method", q_raw["method"].astype(str))
    if "precision" in d_raw.columns:  # the 4-bit rows' speed-ups compare with dense int4, not the fp32 baseline
        d_raw = d_raw[d_raw["precision"].astype(str) == "fp32"]
    d = _numbers(d_raw, {"target_sparsity": "target", "speedup": "speedup"})
    d.insert(0, "method", d_raw["config"].map(_decode_method))
    q, d = q.dropna(), d[d["method"] != "dense"].dropna()
    for df in (q, d):
        df["target"] = df["target"].round(3)
    dense = float((q["perplexity"] / q["ratio"]).median()) if len(q) else None
    joined = q.drop(columns="ratio").merge(d, on=["method", "target"])
    unmatched = sorted(set(q["method"]) - set(joined["method"]))
    if unmatched:
        notes.append(f"{decode.name} has no measured decode speed-up for {', '.join(unmatched)}")
    if not len(joined):
        notes.append("no method and sparsity has both a perplexity and a measured decode speed-up")
    return (joined if len(joined) else None), dense, notes
