"""Static, routed, per-prompt and per-token masks at equal average FFN sparsity: perplexity without and with training.

    python bench/bench_dynamic.py                     # full run (about an hour on 2 idle cores; resumable)
    python bench/bench_dynamic.py --quick             # smoke run: short protocols, few steps
    python bench/bench_dynamic.py --report            # the markdown table from what is cached

Methods, at each target FFN sparsity (default 25, 40, 50 and 70% of the channels of every layer):
- oracle: per token, exactly k channels in every layer, the true top ones by |act(gate(x)) * up(x)|
  (headlab.engine.dynamic.rules; not an upper bound: the methods below fix only the average count);
- exact: the oracle's score |act(gate(x)) * up(x)| thresholded per layer, calibrated to the target (the count
  varies per token, the average per layer is the target);
- cats / teal / wina: the training-free rules, thresholds calibrated per layer to the target
  (TEAL and WINA sparsify the inputs of every matrix, so their target is input sparsity);
- teal-ffn / wina-ffn: TEAL and WINA on the FFN's inputs only (gate, up, down) at the target, the attention
  dense: the part of the model the IPN sparsifies, at the same level;
- teal-at-ipn-weights / wina-at-ipn-weights: TEAL and WINA on all seven matrices at the level (column level)
  whose weights_skipped on the calibration windows equals the trained IPN's there (matched_weights_skipped;
  headlab.engine.dynamic.calibrate_weights_skipped), so they read as few weights per token as the IPN;
- ipn-untrained: the importance network with the oracle's score on the 4-bit weight sketch and per-layer
  calibrated thresholds, no training (headlab.engine.dynamic.ipn.untrained_ipn);
- ipn: the network trained end to end (KL to the dense model + sparsity + consistency, model frozen);
  both read the sketch of the weights in a randomly rotated input space (headlab.engine.dynamic.rotation):
  the shipped SmolLM2 is itself 4-bit (rotation.weight_grid), and a sketch of its weights as stored reproduces
  them almost exactly. ipn-untrained-aligned (every target) and ipn-aligned (--aligned-sparsities) read that aligned
  sketch instead; the columns sketch and sketch_error say which and its relative error on [gate; up];
- oracle-ipn-budgets: the oracle given the trained network's own per-layer budgets (in layer l, the true top
  k_l channels per token, k_l = the network's mean kept count there on the calibration windows);
- ipn+lora: the same with LoRA adapters (rank 8) on the FFN down projections trained jointly;
- ipn+heads: the network also choosing query heads per token (target head sparsity 25%, --heads-sparsities, default 50% only);
- per-prompt: one mask per window, predicted by the trained network from the window's first 64 tokens,
  then kept for the whole window (headlab.engine.dynamic.prompt_mask), scored on the tokens after those 64
  only (scored_from), against the dense model on the same tokens (dense_ppl_*), never on its own prefix;
- router: k = 4 masks, one per cluster of 16 calibration prompts, each window routed by its first 64 tokens,
  scored like per-prompt;
- static: one FFN-channel mask for every input, by FLAP (fluctuation + bias compensation, the best static
  width method of bench_quality), at the same channel budget.
Calibration and training: 8 windows of 256 tokens from the shipped calibration text (the END of the
WikiText-2 test file). Evaluation: the pinned protocol (the START of the file) and a held-out slice
(12 windows of 512 tokens from token 150,000, as bench_quality); ratios against the dense model in the
same process. Columns: ffn_sparsity and weights_skipped (headlab.engine.dynamic.SparsityReport: the fraction
of every layer's seven projection weights a sparse kernel need not read per token, one denominator for every
method) measured on the main protocol's tokens, *_heldout the same on the held-out slice; recall and
precision of the networks' channels against the oracle's top-k on the main protocol's windows (not the
training windows). Each row is cached in
~/.cache/headlab/bench/dynamic.json ($HEADLAB_CACHE), trained networks beside it, so a rerun resumes;
--fresh starts over. A network's folder is named by a digest of the model, every IPNConfig field and the
training windows (headlab.engine.dynamic.ipn.training_key), and a row measured with a network records that
digest: a run with other settings (e.g. --steps 50 after 100) trains and measures anew, never reuses.
Writes bench/results/dynamic.csv, and bench/results/dynamic_layers.csv: per method, target and layer, the FFN
channels kept per token on the main protocol (kept_mean, and kept_p10 / kept_p90, the 10th and 90th percentiles
over tokens; per-prompt and routed masks: over windows, every token of a window keeps the same; static: one mask).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.bench_quality import HELDOUT_OFFSET, heldout_windows
from bench.machine import cpu_name
from headlab.engine.core import gates
from headlab.engine.core.csvfile import write_rows
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.dynamic import (
    SparsityMeter,
    Thresholds,
    apply_rule,
    calibrate,
    calibrate_weights_skipped,
    calibration_ids,
)
from headlab.engine.dynamic.ipn import (
    RULE_NAME,
    IPNConfig,
    apply_ipn,
    load_ipn,
    oracle_agreement,
    oracle_at_budgets,
    save_ipn,
    train_ipn,
    training_key,
    untrained_ipn,
    weights_skipped,
)
from headlab.engine.dynamic.prompt_mask import RoutedMasks, predict_prompt_mask
from headlab.engine.dynamic.rotation import ALIGNED, ROTATED, sketch_errors
from headlab.engine.models.load import load_model
from headlab.engine.pruning.strategies import Budget, Calibration, get_strategy
from headlab.engine.runtime.evaluate import (
    DEFAULT_PROTOCOL,
    PerplexityProtocol,
    eval_windows,
    window_nll,
)
from headlab.engine.runtime.regions import check_fit_texts, check_region_windows

PROMPT = 64  # tokens a per-prompt or routed mask is predicted from
RULES = ("oracle", "exact", "cats", "teal", "wina", "teal-ffn", "wina-ffn")
#: Rules also run over every matrix at the trained IPN's weights_skipped (rows "<rule>-at-ipn-weights").
MATCHED_RULES = ("teal", "wina")
#: Rows cached with another format are measured again: 2 added weights_skipped, held-out sparsity, and recall
#: and precision on the evaluation windows; 3 scores per-prompt and routed masks on the tokens after their prefix;
#: 4 records the kept FFN channels per layer (mean and 10th/90th percentile over tokens).
ROW_FORMAT = 4


def _cache_dir() -> Path:
    d = Path(os.environ.get("HEADLAB_CACHE", Path.home() / ".cache" / "headlab")) / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


class Rows:
    """Results by key, written to a JSON file after every row so an interrupted run resumes."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.rows: dict[str, dict] = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, key: str, make: Callable[[], dict], stamp: dict | None = None) -> dict:
        """The row `key`, made now unless cached with the same `stamp` (what it was measured with) and ROW_FORMAT."""
        stamp = {"format": ROW_FORMAT, **(stamp or {})}
        cached = self.rows.get(key)
        if cached is None or cached.get("stamp") != stamp:
            t = time.perf_counter()
            row = make()
            row.setdefault("eval_s", round(time.perf_counter() - t, 1))
            row["stamp"] = stamp
            self.rows[key] = row
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rows, indent=1))
            os.replace(tmp, self.path)
            print(f"  {key}: {json.dumps(row)}", flush=True)
        return self.rows[key]


@torch.no_grad()
def _nll(handle, windows: torch.Tensor, score_from: torch.Tensor, context: Callable[[int], Any],
         batch_size: int = 4) -> float:
    """Perplexity over `windows`, window i run inside context(i) (batches share a context when it is per call)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(handle.device)
        with context(i):
            logits = handle.model(input_ids=ids).logits
        s, c = window_nll(logits, ids, score_from[i : i + batch_size])
        total, count = total + float(s), count + c
    return math.exp(total / count)


def mask_weights_skipped(handle, channels: torch.Tensor, heads: torch.Tensor | None) -> float:
    """SparsityReport.weights_skipped of one mask for every token: kept channels [L, F] (and kept heads [L, H]).

    A dropped channel skips its gate row, up row and down column (the mask is known before the layer runs);
    a dropped head its Q rows and O columns; over the weights of every layer's seven projections.
    """
    g = handle.geometry
    skipped = total = 0.0
    for layer in range(g.n_layers):
        p = handle.adapter.projections(layer)
        total += sum(w.weight.numel() for w in p.values())
        dropped = g.ffn_dim - float(channels[layer].float().sum())
        skipped += dropped * (p["down"].out_features + p["gate"].in_features + p["up"].in_features)
        if heads is not None:
            dropped_heads = g.n_heads - float(heads[layer].float().sum())
            skipped += dropped_heads * g.head_dim * (p["o"].out_features + p["q"].in_features)
    return skipped / total


def continuation(score_from: torch.Tensor) -> torch.Tensor:
    """Where scoring starts when a mask is predicted from each window's first PROMPT tokens: the token after them.

    A per-prompt or routed mask that saw tokens 0..PROMPT-1 is scored only on tokens PROMPT.. (predicted from
    logits at PROMPT-1..), none of which it saw; scored on its own prefix, it would grade itself on its input.
    """
    return score_from.clamp(min=PROMPT)


@torch.no_grad()
def _nll_per_window(handle, windows: torch.Tensor, score_from: torch.Tensor, mask_of: Callable
                    ) -> tuple[float, float, float, dict]:
    """Perplexity with a static mask predicted per window from its first PROMPT tokens (mask_of(ids [1, PROMPT])),
    scored on the tokens after them only; the mean FFN sparsity and the mean weights_skipped of the masks, and
    their kept channels per layer (mask_layer_columns)."""
    score_from = continuation(score_from)
    total, count, sparsity, skipped, kept = 0.0, 0, [], [], []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1].to(handle.device)
        pm = mask_of(ids[:, :PROMPT])
        sparsity.append(pm.ffn_sparsity)
        skipped.append(mask_weights_skipped(handle, pm.channels, pm.heads))
        kept.append(pm.channels)
        with gates.apply(handle, pm.to_prune_mask(handle)):
            logits = handle.model(input_ids=ids).logits
        s, c = window_nll(logits, ids, score_from[i : i + 1])
        total, count = total + float(s), count + c
    return (math.exp(total / count), sum(sparsity) / len(sparsity), sum(skipped) / len(skipped),
            mask_layer_columns(handle, kept))


def _dynamic_row(handle, apply: Callable[[SparsityMeter], Any], name: str, main, heldout) -> dict:
    """Main and held-out perplexity under a per-call context, and the sparsity it reached on each text's tokens."""
    meters = [SparsityMeter(name, handle.geometry.n_layers) for _ in range(2)]
    ppl_main = _nll(handle, *main, lambda i: apply(meters[0]))
    ppl_ho = _nll(handle, *heldout, lambda i: apply(meters[1]))
    rep, rep_ho = (m.report() for m in meters)
    heads = rep.per_layer.get("o") if name == RULE_NAME else None  # TEAL/WINA's "o" is input sparsity, not heads
    return {"ppl_main": ppl_main, "ppl_heldout": ppl_ho, "ffn_sparsity": rep.ffn, "ffn_sparsity_heldout": rep_ho.ffn,
            "weights_skipped": rep.weights_skipped, "weights_skipped_heldout": rep_ho.weights_skipped,
            "input_sparsity": rep.overall, "head_sparsity": None if heads is None else sum(heads) / len(heads),
            "layers": layer_columns(handle, rep.kept_mean, rep.kept_p10, rep.kept_p90)}


def layer_columns(handle, mean, p10, p90) -> dict:
    """The per-layer kept FFN channels of a row (main protocol): mean and 10th/90th percentile over tokens."""
    return {"ffn_dim": handle.geometry.ffn_dim, "kept_mean": [float(v) for v in mean],
            "kept_p10": [float(v) for v in p10], "kept_p90": [float(v) for v in p90]}


def mask_layer_columns(handle, kept: list[torch.Tensor]) -> dict:
    """layer_columns of per-window masks, kept [L, F] per window: every token of a window keeps its window's
    channels, so the spread over tokens is the spread over (equal-length) windows."""
    counts = torch.stack([k.float().sum(-1) for k in kept]).double()  # (windows, L)
    return layer_columns(handle, counts.mean(0).tolist(), counts.quantile(0.1, dim=0, interpolation="lower").tolist(),
                         counts.quantile(0.9, dim=0, interpolation="higher").tolist())


def matched_rule_row(handle, rule: str, ipn, calib: torch.Tensor, main, heldout) -> dict:
    """`rule` over every matrix at the level whose weights_skipped on the calibration windows `calib` is the
    network's there (not fitted on the evaluated text): its row, the level and the weights_skipped matched."""
    matched = weights_skipped(handle, ipn, calib)
    th = calibrate_weights_skipped(handle, rule, matched, calib)
    return {**_dynamic_row(handle, lambda m: apply_rule(handle, th, m), rule, main, heldout),
            "level": th.meta["level"], "matched_weights_skipped": matched}


def network_folder(nets: Path, handle, cfg: IPNConfig, ids: torch.Tensor) -> Path:
    """Where the network trained with `cfg` on `ids` is cached: its target and steps, then the digest of every setting."""
    return nets / f"{cfg.target:.2f}-{cfg.steps}steps-{training_key(handle, cfg, ids)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.7")
    ap.add_argument("--steps", type=int, default=100, help="IPN training steps")
    ap.add_argument("--lora-sparsities", default="0.5", help="targets that also get an ipn+lora row")
    ap.add_argument("--aligned-sparsities", default="0.5,0.7",
                    help="targets that also get a network trained on the aligned sketch (ipn-aligned)")
    ap.add_argument("--heads-sparsities", default="0.5",
                    help="targets that also get an ipn+heads row (the network choosing query heads too)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 short windows, 4 steps")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--report", action="store_true", help="print the table of cached rows and exit")
    ap.add_argument("--no-training", action="store_true",
                    help="skip the rows that need a trained network not cached yet (rules and ipn-untrained only)")
    ap.add_argument("--csv", default="bench/results/dynamic.csv")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads (1 on a machine shared with other jobs: oversubscribed threads spin)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    suffix = "-quick" if args.quick else ""
    rows = Rows(_cache_dir() / f"dynamic{suffix}.json", args.fresh)
    if args.report:
        if rows.rows and not args.quick:
            write_csv(rows.rows, args.csv)
        print(report(rows.rows))
        return
    handle = load_model(args.model, dtype="float32")
    protocol = PerplexityProtocol(window=128, stride=128, n_windows=2) if args.quick else DEFAULT_PROTOCOL
    main_w = eval_windows(handle, protocol)
    ho = heldout_windows(handle, HELDOUT_OFFSET, protocol.window, protocol.n_windows)
    heldout = (ho, torch.ones(ho.shape[0], dtype=torch.long))
    where = check_fit_texts(handle, calibration_texts("wikitext"), "training and calibration")
    if not args.quick:  # the windows scored are the regions the fitted texts were checked against
        check_region_windows(handle, main=main_w[0], heldout=ho)
    print(f"# disjoint texts: {where}", flush=True)
    steps = 4 if args.quick else args.steps
    n_windows = 4 if args.quick else 8
    calib = calibration_ids(handle, window=256, n_windows=n_windows)
    prompts = list(calibration_ids(handle, window=PROMPT, n_windows=16).split(1))
    targets = [float(s) for s in args.sparsities.split(",")]
    lora_targets = {float(s) for s in args.lora_sparsities.split(",") if s}
    aligned_targets = {float(s) for s in args.aligned_sparsities.split(",") if s}
    heads_targets = {float(s) for s in args.heads_sparsities.split(",") if s}
    nets = _cache_dir() / f"dynamic-ipn{suffix}"

    dense = rows.get("dense", lambda: {"ppl_main": _nll(handle, *main_w, lambda i: contextlib.nullcontext()),
                                       "ppl_heldout": _nll(handle, *heldout, lambda i: contextlib.nullcontext()),
                                       "ffn_sparsity": 0.0, "weights_skipped": 0.0})
    print(f"# {handle.name} on {cpu_name()}, {torch.get_num_threads()} threads; dense main {dense['ppl_main']:.3f}, "
          f"held-out {dense['ppl_heldout']:.3f}", flush=True)

    def config(target: float, **kw) -> IPNConfig:
        return IPNConfig(target=target, steps=steps, n_windows=n_windows, **kw)

    def trained(target: float, **kw) -> tuple[Any, dict]:
        cfg = config(target, **kw)
        folder = network_folder(nets, handle, cfg, calib)
        if (folder / "ipn.json").exists():
            meta = json.loads((folder / "ipn.json").read_text())["meta"]
            if meta.get("config") != cfg.to_dict():  # the key is a digest of it: a mismatch is a bug, not a miss
                raise SystemExit(f"{folder} holds a network trained with {meta.get('config')}, not {cfg.to_dict()}")
            return load_ipn(handle, folder), meta
        t = time.perf_counter()
        run = train_ipn(handle, cfg, calib, on_step=lambda e: print(
            f"    step {e['step']}: kl {e['kl']:.4f} sparsity {e['ffn_sparsity']:.3f}", flush=True)
            if e["step"] % 20 == 0 else None)
        meta = {"train_s": round(time.perf_counter() - t, 1), "config": cfg.to_dict(),
                "training_key": training_key(handle, cfg, calib),
                "final_kl": run.history[-1]["kl"] if run.history else None}
        save_ipn(handle, run.ipn, folder, meta=meta)
        return run.ipn, meta

    dense_after_prompt: dict[str, float] = {}  # the dense model on the same continuation tokens, for the ratios

    def _per_window_row(mask_of: Callable) -> dict:
        if not dense_after_prompt:
            for name, (w, sf) in (("dense_ppl_main", main_w), ("dense_ppl_heldout", heldout)):
                dense_after_prompt[name] = _nll(handle, w, continuation(sf), lambda i: contextlib.nullcontext())
        ppl, sp, skipped, layers = _nll_per_window(handle, *main_w, mask_of)
        ppl_ho, sp_ho, skipped_ho, _ = _nll_per_window(handle, *heldout, mask_of)
        return {"ppl_main": ppl, "ppl_heldout": ppl_ho, "ffn_sparsity": sp, "ffn_sparsity_heldout": sp_ho,
                "weights_skipped": skipped, "weights_skipped_heldout": skipped_ho, "scored_from": PROMPT,
                "layers": layers, **dense_after_prompt}

    errors = sketch_errors(handle)
    print(f"# gate/up 4-bit sketch relative error: rotated {errors[ROTATED]:.2%}, aligned {errors[ALIGNED]:.2%}"
          f"{' (the weights lie on a 4-bit grid)' if errors[ALIGNED] < 0.02 else ''}", flush=True)

    def sketch_columns(sketch: str) -> dict:
        return {"sketch": sketch, "sketch_error": errors[sketch]}

    def agreement(ipn) -> dict:  # on the evaluation windows, not the ones the network was trained on
        a = oracle_agreement(handle, ipn, main_w[0])
        return {"recall": sum(r.recall for r in a) / len(a), "precision": sum(r.precision for r in a) / len(a)}

    for s in targets:
        print(f"\n## target {s:.0%}", flush=True)
        for rule in RULES:
            def run_rule(rule=rule, s=s):
                th = Thresholds.oracle(handle.geometry.n_layers, handle.geometry.ffn_dim, s) if rule == "oracle" \
                    else calibrate(handle, rule, s, calib)
                return _dynamic_row(handle, lambda m: apply_rule(handle, th, m), rule, main_w, heldout)
            rows.get(f"{rule}@{s}", run_rule)

        for sketch, name in ((ROTATED, "ipn-untrained"), (ALIGNED, "ipn-untrained-aligned")):
            def run_untrained(s=s, sketch=sketch):
                t = time.perf_counter()
                ipn = untrained_ipn(handle, s, calib, sketch=sketch)
                row = {"train_s": round(time.perf_counter() - t, 1), **agreement(ipn), **sketch_columns(sketch)}
                return {**_dynamic_row(handle, lambda m: apply_ipn(handle, ipn, m), "ipn", main_w, heldout), **row}
            rows.get(f"{name}@{s}", run_untrained, {"sketch": sketch})

        if args.no_training and not (network_folder(nets, handle, config(s), calib) / "ipn.json").exists():
            continue

        def net_stamp(s=s, **kw) -> dict:
            return {"network": training_key(handle, config(s, **kw), calib)}

        def run_ipn(s=s, **kw):
            ipn, meta = trained(s, **kw)
            return {**_dynamic_row(handle, lambda m: apply_ipn(handle, ipn, m), "ipn", main_w, heldout),
                    "train_s": meta["train_s"], "steps": meta["config"]["steps"], **agreement(ipn),
                    **sketch_columns(ipn.sketch)}
        rows.get(f"ipn@{s}", run_ipn, net_stamp())
        if s in aligned_targets:
            rows.get(f"ipn-aligned@{s}", lambda: run_ipn(sketch=ALIGNED), net_stamp(sketch=ALIGNED))

        def run_oracle_budgets(s=s):
            ipn, _ = trained(s)
            th = oracle_at_budgets(handle, ipn, calib)
            return {**_dynamic_row(handle, lambda m: apply_rule(handle, th, m), "oracle", main_w, heldout),
                    "budgets": th.values["down"].tolist()}
        rows.get(f"oracle-ipn-budgets@{s}", run_oracle_budgets, net_stamp())

        for rule in MATCHED_RULES:
            rows.get(f"{rule}-at-ipn-weights@{s}",
                     lambda rule=rule, s=s: matched_rule_row(handle, rule, trained(s)[0], calib, main_w, heldout),
                     net_stamp())
        if s in lora_targets:
            rows.get(f"ipn+lora@{s}", lambda: run_ipn(lora_rank=8), net_stamp(lora_rank=8))
        if s in heads_targets:
            rows.get(f"ipn+heads@{s}", lambda: run_ipn(heads=True, head_target=0.25),
                     net_stamp(heads=True, head_target=0.25))

        def run_prompt(s=s):
            ipn, meta = trained(s)
            return {**_per_window_row(lambda p: predict_prompt_mask(handle, ipn, p)), "train_s": meta["train_s"]}
        rows.get(f"per-prompt@{s}", run_prompt, net_stamp())

        def run_router(s=s):
            ipn, meta = trained(s)
            routed = RoutedMasks.fit(handle, ipn, prompts, k=4)
            return {**_per_window_row(lambda p: routed.route(handle, p)), "train_s": meta["train_s"]}
        rows.get(f"router@{s}", run_router, net_stamp())

        def run_static(s=s):
            t = time.perf_counter()
            cal = Calibration.shipped("wikitext", n=8 if args.quick else 32)
            mask = get_strategy("flap")(handle, Budget(ffn=s), cal)
            sel = round(time.perf_counter() - t, 1)
            with_mask = lambda i: gates.apply(handle, mask)
            sparsity, skipped = 1.0 - float(mask.ffn.mean()), mask_weights_skipped(handle, mask.ffn, mask.heads)
            return {"ppl_main": _nll(handle, *main_w, with_mask), "ppl_heldout": _nll(handle, *heldout, with_mask),
                    "ffn_sparsity": sparsity, "ffn_sparsity_heldout": sparsity, "weights_skipped": skipped,
                    "weights_skipped_heldout": skipped, "train_s": sel,
                    "layers": mask_layer_columns(handle, [mask.ffn])}
        rows.get(f"static@{s}", run_static)

    if not args.quick:
        write_csv(rows.rows, args.csv)
    print(report(rows.rows))


def write_csv(rows: dict[str, dict], path: str) -> None:
    """One CSV row per (method, target) with its ratios to the dense rows."""
    dense = rows["dense"]
    table = []
    for key, r in rows.items():
        if key == "dense":
            continue
        method, target = key.split("@")
        table.append({"method": method, "target": float(target), **r,
                      "ratio_main": r["ppl_main"] / r.get("dense_ppl_main", dense["ppl_main"]),
                      "ratio_heldout": r["ppl_heldout"] / r.get("dense_ppl_heldout", dense["ppl_heldout"])})
    table.sort(key=lambda r: (r["target"], r["method"]))
    cols = ["method", "target", "ppl_main", "ratio_main", "ppl_heldout", "ratio_heldout", "scored_from",
            "ffn_sparsity", "ffn_sparsity_heldout", "weights_skipped", "weights_skipped_heldout", "level",
            "matched_weights_skipped", "input_sparsity",
            "head_sparsity", "recall", "precision", "sketch", "sketch_error", "steps", "train_s", "eval_s"]
    write_rows([{c: r.get(c) for c in cols} for r in table], path)
    print(f"wrote {path} (dense main {dense['ppl_main']:.3f}, held-out {dense['ppl_heldout']:.3f})")
    layers_path = Path(path).with_name(Path(path).stem + "_layers.csv")
    layers = layer_table(table)
    if layers:
        write_rows(layers, layers_path)
        print(f"wrote {layers_path} (kept FFN channels per layer: mean, 10th and 90th percentile over tokens)")


def layer_table(table: list[dict]) -> list[dict]:
    """One row per (method, target, layer) of the rows that recorded their kept channels per layer."""
    out = []
    for r in table:
        layers = r.get("layers")
        if not layers:
            continue
        for layer, (mean, p10, p90) in enumerate(zip(layers["kept_mean"], layers["kept_p10"], layers["kept_p90"])):
            out.append({"method": r["method"], "target": r["target"], "layer": layer, "ffn_dim": layers["ffn_dim"],
                        "kept_mean": mean, "kept_p10": p10, "kept_p90": p90})
    return out


def report(rows: dict[str, dict]) -> str:
    """Markdown: perplexity ratio to dense (main / held-out) per method x target sparsity."""
    if "dense" not in rows:
        return "(nothing cached yet)"
    dense = rows["dense"]
    targets = sorted({float(k.split("@")[1]) for k in rows if "@" in k})
    methods = list(dict.fromkeys(k.split("@")[0] for k in rows if "@" in k))
    lines = ["| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            r = rows.get(f"{m}@{t}")
            cells.append("-" if r is None else f"{r['ppl_main'] / r.get('dense_ppl_main', dense['ppl_main']):.3f}x / "
                         f"{r['ppl_heldout'] / r.get('dense_ppl_heldout', dense['ppl_heldout']):.3f}x "
                         f"({r['ffn_sparsity']:.1%})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
