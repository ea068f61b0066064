"""Perplexity after pruning without recovery: the classic criteria against the quality strategies.

    python bench/bench_quality.py                 # full run (hours on a shared CPU; resumable)
    python bench/bench_quality.py --quick         # smoke run: short protocols, few texts, few steps

Configurations: 10, 20, 30 and 50% of the attention heads; ~20% of the parameters by width
(the same fraction of heads and FFN channels) and by depth (whole layers, the count that
brings the size closest to the same target).
Reconstruction rows (headlab.engine.pruning.strategies.reconstruct: obs, flap-refit, ablation-refit; depth
methods with -refit) run on heads30, heads50, width20 and depth20 by default:
    python bench/bench_quality.py --configs heads30,heads50,width20,depth20 --methods obs,flap-refit,ablation-refit \
        --depth-methods ablation-iterative-refit,block_influence-refit
`select_s` is the wall time a method took to choose its mask, `select_cpu_min` the CPU minutes of this
process in that time (every thread counted).
Calibration: 32 WikiText-2 test paragraphs from the END of the file (headlab.engine.data.datasets), up
to 256 tokens each; the measured methods replay the first 4 of them (128 tokens each). A method's
`calibration=mixed` setting (e.g. "obs[inputs=all,calibration=mixed,n_texts=256]") calibrates and re-fits on
WikiText paragraphs and the model's own answers to training prompts instead
(headlab.engine.runtime.continuations.mixed_texts); `calib_texts=512` measures the calibration statistics (FLAP's
per-layer counts) on 512 paragraphs instead of 32.
Evaluation, both printed with their token ranges:
- main: the pinned protocol (headlab.engine.runtime.evaluate.DEFAULT_PROTOCOL): the START of the file;
- held-out: 12 windows of 512 tokens from the MIDDLE of the file (token offset 150,000),
  never used for calibration, for choosing methods or for tuning; the run checks that the
  calibration paragraphs lie after it.
Beyond perplexity, on the held-out windows (headlab.engine.runtime.agreement): `top1_heldout`, the fraction
of positions where the pruned model's most likely next token is the dense model's, and
`greedy_heldout`, the common prefix of the two models' greedy continuations (32 new tokens after the
first 32 tokens of each window) as a fraction of 32. Rows cached without them get them on the next run.
Every (method, configuration) mask and every perplexity is cached under
~/.cache/headlab/bench/ ($HEADLAB_CACHE; JSON + safetensors), so an interrupted run resumes;
--fresh starts over, --report tabulates what is cached. Ratios are against the dense model
measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from headlab.engine.core.csvfile import write_rows
from headlab.engine.core.files import write_atomic_safetensors, write_atomic_text
from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.capture import CaptureStats
from headlab.engine.models.load import DEFAULT_MODEL, load_model
from headlab.engine.models.load import cache_dir as cache_dir_root
from headlab.engine.pruning.strategies import Budget, Calibration, get_strategy
from headlab.engine.pruning.strategies.depth import DEPTH_METHODS, depth_prune
from headlab.engine.pruning.strategies.reconstruct import (
    AUTO_ALLOCATION,
    DEPTH_INPUTS,
    DEPTH_REFIT_METHODS,
    REFIT_SUFFIX,
    REFIT_TEXTS,
    depth_refit_prune,
    refit_texts,
    width_fraction,
)
from headlab.engine.runtime.agreement import DenseReference, agreement, dense_reference
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import (
    DEFAULT_PROTOCOL,
    PerplexityProtocol,
    _wikitext_ids,
    eval_windows,
    leading_bos,
    perplexity,
    text_windows,
)
from headlab.engine.runtime.regions import (
    HELDOUT_OFFSET,
    check_fit_texts,
    check_region_windows,
    guard,
    ood_nll,
    region_perplexity,
)

HEAD_METHODS = ("random", "magnitude", "entropy", "gradient", "gradient-iterative", "flap",
                "ablation", "ablation+comp", "ablation-iterative+comp", "hardconcrete+comp")
RECONSTRUCT_METHODS = ("obs", "flap-refit", "ablation-refit")
RECONSTRUCT_CONFIGS = ("heads30", "heads50", "width20")
BENCH_DEPTH_METHODS = ("random", "magnitude", "entropy", "gradient", "block_influence", "ablation-iterative",
                       "ablation-iterative+comp", "block_influence-refit", "ablation-iterative-refit")
CONFIGS = ("heads10", "heads20", "heads30", "heads50", "width20", "depth20")
AGREE_PROMPTS, AGREE_NEW = 12, 32  # greedy agreement: the first 32 tokens of each held-out window, 32 new tokens
RESULTS = Path("bench/results")
CACHE_VERSION = 2  # raised when a method's code changes what it chooses (2: input re-fits, joint allocation)
Row = dict[str, Any]


# --- evaluation ------------------------------------------------------------------------------
def heldout_windows(handle: Any, offset: int, window: int, n: int) -> torch.Tensor:
    """[n, window] token windows from token `offset` (each scored from its second token; BOS first as the protocol's)."""
    return text_windows(_wikitext_ids(handle.tokenizer), window, window, n, leading_bos(handle.tokenizer), start=offset)


heldout_perplexity = region_perplexity  # perplexity over given windows, the mask applied per call


# --- caching -----------------------------------------------------------------------------------
def results_csv(stem: str, model: str | None, quick: bool, csv: str | None) -> Path:
    """Where a run's rows go: `csv`, else bench/results/<stem>[_quick].csv, which holds the default model's rows.

    Another model's rows must be sent elsewhere by name (SystemExit otherwise, before anything runs), so they
    never replace the default model's rows of the same configuration and method.
    """
    if csv:
        return Path(csv)
    if model not in (None, DEFAULT_MODEL):
        raise SystemExit(f"--model {model}: name its results file with --csv (e.g. --csv {RESULTS}/{stem}_gemma3.csv); "
                         f"{RESULTS}/{stem}.csv holds {DEFAULT_MODEL}'s rows")
    return RESULTS / f"{stem}{'_quick' if quick else ''}.csv"


def bench_cache(model: str | None, quick: bool) -> Path:
    """Where this benchmark keeps its masks and results for `model` (None: the default)."""
    tag = "quality_quick" if quick else "quality"
    return cache_dir_root() / "bench" / f"{tag}_v{CACHE_VERSION}_{(model or DEFAULT_MODEL).replace('/', '_')}"


def cached_mask_path(cache_dir: Path, method: str, config: str) -> Path:
    safe = (method.replace("+", "_plus_").replace("[", "(").replace("]", ")").replace("=", "-").replace(",", "_")
            .replace("/", "-"))
    return cache_dir / "masks" / f"{safe}__{config}.json"


def stale_reason(mask: PruneMask, method: str, config: str) -> str | None:
    """Why a cached mask is not what `method` makes at `config` today (None: it is).

    A name leaves its "auto" allocation implicit (a depth method's, its input mode), and "auto" follows the
    validation choices (AUTO_ALLOCATION, DEPTH_INPUTS): a mask cached before a choice changed was made with the
    old setting. A "global" or
    "joint" allocation cached before it read the re-fit's own texts (no "allocation_texts" in its meta)
    measured its costs on REFIT_TEXTS texts, whatever `n_texts` the re-fit had.
    """
    settings = parse_spec(method)[1]
    if config.startswith("depth") and "inputs" not in settings:  # depth's "auto" input mode is its own choice
        made = mask.meta.get("reconstruction", {}).get("inputs")
        if made is not None and made != DEPTH_INPUTS:
            return f"made with inputs={made}; {method} now means inputs={DEPTH_INPUTS}"
    used = mask.meta.get("allocation")
    n_texts = int(settings.get("n_texts", REFIT_TEXTS))
    if used in ("global", "joint") and "allocation_texts" not in mask.meta and n_texts > REFIT_TEXTS:
        return f"its {used} allocation was measured on {REFIT_TEXTS} texts, not the re-fit's {n_texts}"
    if mask.meta.get("allocation_asked") != "auto" or "allocation" in settings:
        return None
    now = AUTO_ALLOCATION["width" if config.startswith("width") else "heads"]
    return None if used == now else f"made with allocation {used}; {method} now means allocation {now}"


def load_cached_mask(path: Path, method: str, config: str, geometry: Any,
                     results: dict[str, Any] | None = None) -> PruneMask | None:
    """The mask cached at `path` if it is still what `method` makes at `config`, else None (made again).

    A stale mask's entry in `results` (keyed "method@config") is dropped too: it was measured on that mask.
    """
    if not path.exists():
        return None
    mask = PruneMask.load(path, geometry)
    why = stale_reason(mask, method, config)
    if why:
        print(f"  {path.name}: cached mask is stale ({why}); making it again", flush=True)
        if results is not None:
            results.pop(f"{method}@{config}", None)
        return None
    return mask


def save_stats(stats: CaptureStats, path: Path) -> None:
    tensors = {f.name: getattr(stats, f.name) for f in fields(stats)
               if isinstance(getattr(stats, f.name), torch.Tensor)}
    write_atomic_safetensors(path, tensors)
    scalars = {f.name: getattr(stats, f.name) for f in fields(stats) if not isinstance(getattr(stats, f.name), torch.Tensor)}
    write_atomic_text(path.with_suffix(".json"), json.dumps(scalars))


def load_stats(path: Path) -> CaptureStats | None:
    from safetensors.torch import load_file

    if not path.exists() or not path.with_suffix(".json").exists():
        return None
    return CaptureStats(**load_file(str(path)), **json.loads(path.with_suffix(".json").read_text()))


def save_tensors(cache: dict[str, Any], path: Path) -> None:
    """The calibration's measured tables (ablation KLs, compensated gradients) as safetensors."""
    out = {}
    for k, v in cache.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.contiguous()
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out.update({f"{k}#{i}": t.contiguous() for i, t in enumerate(v)})
    if out:
        write_atomic_safetensors(path, out)


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not path.exists():
        return {}
    flat = load_file(str(path))
    out: dict[str, Any] = {}
    for k in sorted(flat):
        if "#" in k:
            base, _ = k.split("#")
            out[base] = (*out.get(base, ()), flat[k])
        else:
            out[k] = flat[k]
    return out


# --- configurations -------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A method with settings, "obs[inputs=none,allocation=flap]", as ("obs", {"inputs": "none", ...})."""
    if "[" not in spec:
        return spec, {}
    name, rest = spec.split("[", 1)
    if not rest.endswith("]"):
        raise ValueError(f"method settings must end with ']': {spec!r}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest[:-1].split(",")):
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key] = {"true": True, "false": False}.get(value.lower(), value)
    return name, kwargs


def make_mask(handle: Any, method: str, config: str, calib: Calibration, args: argparse.Namespace,
              cache_dir: Path | None = None) -> PruneMask:
    """The mask of `method` (settings in brackets allowed) at `config`, chosen under a guard that raises if the
    method reads any main, validation, held-out or out-of-domain text.

    With `cache_dir`, a depth `-refit` method re-fits around its base method's cached layers (layer_search); the
    mask's meta "layer_search_reused_s" (and "_cpu_s") is then the seconds that search took when it was made, for
    the caller to count in the selection time.
    """
    if cache_dir is not None and calib.persist_dir is None:
        # slow measurements kept with the bench's cache (the measured-KL allocations under kl_costs/: on the whole
        # fit region most of a width candidate's hour; ablation costs under ablation/), read back by later runs
        calib.persist_dir = cache_dir
    with guard(handle):
        return _make_mask(handle, method, config, calib, args, cache_dir)


def layer_search(handle: Any, base: str, config: str, calib: Calibration,
                 cache_dir: Path | None) -> tuple[PruneMask, tuple[float, float] | None]:
    """(`base`'s depth mask at `config` on `calib`; the wall and CPU seconds its search took if it came from the
    cache, else None). It is bench_quality's own cached mask for (base, config): the search does not depend on
    the re-fit's settings, so candidates that differ only there share it (depth_refit_prune checks it is base's
    on calib)."""
    keep = 1.0 - int(config[5:]) / 100
    path = cached_mask_path(cache_dir, base, config) if cache_dir is not None else None
    if path is not None and path.exists():
        cached = PruneMask.load(path, handle.geometry)
        took = cached.meta.get("bench_select_seconds"), cached.meta.get("bench_select_cpu_seconds")
        if cached.meta.get("calibration") == calib.describe() and None not in took:
            return cached, (float(took[0]), float(took[1]))
    t, cpu = time.perf_counter(), time.process_time()
    mask = depth_prune(handle, keep, base, calib)
    if path is not None and not path.exists():  # bench_quality's row for `base` reuses it too
        mask.meta.update(bench_select_seconds=time.perf_counter() - t,
                         bench_select_cpu_seconds=time.process_time() - cpu)
        mask.save(path)
    return mask, None


def _make_mask(handle: Any, method: str, config: str, calib: Calibration, args: argparse.Namespace,
               cache_dir: Path | None = None) -> PruneMask:
    method, settings = parse_spec(method)
    # "calibration=mixed": that set (WikiText and the model's answers); "calib_texts=512": the calibration (what
    # FLAP's per-layer counts are measured on) that many texts long instead of 32
    data, n_calib = settings.pop("calibration", calib.name), settings.pop("calib_texts", len(calib.texts))
    if data != calib.name or n_calib != len(calib.texts):
        calib = Calibration.shipped(data, n_calib, max_length=calib.max_length, handle=handle)
    if config.startswith("depth"):
        if method in DEPTH_REFIT_METHODS:
            dropped, reused_s = layer_search(handle, method[: -len(REFIT_SUFFIX)], config, calib, cache_dir)
            dropped = dropped.clone()
            for k in [k for k in dropped.meta if k.startswith("bench_")]:  # the search's timing is not the re-fit's
                del dropped.meta[k]
            mask = depth_refit_prune(handle, 1.0 - int(config[5:]) / 100, method, calib, dropped=dropped, **settings)
            if reused_s is not None:
                mask.meta["layer_search_reused_s"], mask.meta["layer_search_reused_cpu_s"] = reused_s
            return mask
        return depth_prune(handle, 1.0 - int(config[5:]) / 100, method, calib, **settings)
    if config.startswith("width"):
        r = round(width_fraction(handle, int(config[5:]) / 100), 4)
        budget = Budget(heads=r, ffn=r)
    else:
        budget = Budget(heads=int(config[5:]) / 100)
    kwargs: dict[str, Any] = dict(settings)
    if "iterative" in method:
        kwargs["steps"] = args.iter_steps
    if method.startswith("hardconcrete"):
        kwargs["steps"] = args.hc_steps
    return get_strategy(method, **kwargs)(handle, budget, calib)


def split_specs(text: str) -> list[str]:
    """Comma-separated methods, where a method's own settings may hold commas inside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [m for m in [*out, cur] if m]


def methods_for(config: str, args: argparse.Namespace) -> list[str]:
    default = list(HEAD_METHODS) + (list(RECONSTRUCT_METHODS) if config in RECONSTRUCT_CONFIGS else [])
    chosen = split_specs(args.methods) if args.methods else default
    if config.startswith("depth"):
        depth = split_specs(args.depth_methods) if args.depth_methods else list(BENCH_DEPTH_METHODS)
        return [m for m in depth if parse_spec(m)[0] in DEPTH_METHODS or parse_spec(m)[0] in DEPTH_REFIT_METHODS]
    return chosen


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 short windows, 8 texts, few steps")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--methods", default=None, help=f"comma-separated (default: {','.join(HEAD_METHODS)})")
    ap.add_argument("--depth-methods", default=None,
                    help=f"default: {','.join(BENCH_DEPTH_METHODS)}; any of "
                         f"{','.join(DEPTH_METHODS + DEPTH_REFIT_METHODS)}")
    ap.add_argument("--report", action="store_true", help="compute nothing new: tabulate every cached result")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids thrashing on shared cores)")
    ap.add_argument("--iter-steps", type=int, default=4)
    ap.add_argument("--hc-steps", type=int, default=80)
    ap.add_argument("--fresh", action="store_true", help="ignore cached masks and results")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = bench_cache(args.model, args.quick)
    (cache_dir / "masks").mkdir(parents=True, exist_ok=True)
    csv_path = results_csv("quality", args.model, args.quick, args.csv)

    handle = load_model(args.model)
    if args.quick:
        main_protocol = PerplexityProtocol(window=256, stride=256, n_windows=2)
        ho_window, ho_n = 256, 2
        calib = Calibration.shipped("wikitext", 8, max_length=128)
        args.iter_steps, args.hc_steps = min(args.iter_steps, 2), min(args.hc_steps, 8)
    else:
        main_protocol = DEFAULT_PROTOCOL
        ho_window, ho_n = 512, 12
        calib = Calibration.shipped("wikitext", 32, max_length=256)
    ho = heldout_windows(handle, HELDOUT_OFFSET, ho_window, ho_n)
    where = check_fit_texts(handle, calib.texts, "calibration")
    where_fit = check_fit_texts(handle, refit_texts(calib), "re-fit")  # every text the re-fitting methods read
    if not args.quick:  # the windows scored are the regions every fitted text was kept away from
        check_region_windows(handle, main=eval_windows(handle, main_protocol)[0], heldout=ho)

    stats_path, tables_path, results_path = cache_dir / "stats.safetensors", cache_dir / "tables.safetensors", cache_dir / "results.json"
    if args.fresh:
        masks = [*(cache_dir / "masks").glob("*.json"), *(cache_dir / "masks").glob("*.refit.safetensors")]
        for p in [stats_path, stats_path.with_suffix(".json"), tables_path, results_path, *masks]:
            p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    stats = load_stats(stats_path)
    if stats is None:
        stats = calib.stats(handle)
        save_stats(stats, stats_path)
    calib.set_stats(stats)
    calib.cache.update(load_tensors(tables_path))
    capture_s = time.perf_counter() - t0
    results: dict[str, Row] = json.loads(results_path.read_text()) if results_path.exists() else {}

    dense_main = perplexity(handle, None, main_protocol)
    dense_ho = heldout_perplexity(handle, None, ho)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_quality: {handle.name}, {args.threads} thread(s) on {platform.machine()} "
          f"({os.cpu_count()} cores, load average {load:.1f} at start: timings are indicative only)")
    print(f"# calibration: {calib.describe()} from the END of WikiText-2 test ({where}); "
          f"measured methods replay the first 4 texts x 128 tokens; capture {capture_s:.0f} s (0: cached)")
    print(f"# re-fit texts: {where_fit}; every mask is chosen under a guard that fails on any main, validation, "
          "held-out or out-of-domain text (headlab.engine.runtime.regions)")
    print(f"# main protocol: {dense_main.protocol.describe(dense_main.tokenizer, dense_main.n_tokens)} "
          f"(tokens 0-{main_protocol.window * main_protocol.n_windows:,})")
    print(f"# held-out: WikiText-2 test tokens {HELDOUT_OFFSET:,}-{HELDOUT_OFFSET + ho.numel():,} "
          f"({ho_n} windows of {ho_window}), not used for calibration or for choosing methods")
    print(f"# dense perplexity: main {dense_main.perplexity:.3f}, held-out {dense_ho:.3f}; no recovery training\n",
          flush=True)

    rows: list[Row] = []
    todo = [(c, m) for c in args.configs.split(",") for m in methods_for(c, args)]
    if args.report:
        todo = [(r["config"], r["method"]) for r in results.values()]
    reference: list[DenseReference] = []  # the dense side of the agreement columns, computed on first need
    dense_ood: list[float] = []

    def ood_columns(mask: PruneMask) -> Row:
        """Mean NLL per token on the out-of-domain items (chat-formatted), the pruned model's and its change."""
        if not dense_ood:
            dense_ood.append(ood_nll(handle, None)["all"])
        pruned = ood_nll(handle, mask)["all"]
        return {"ood_nll": round(pruned, 4), "ood_nll_delta": round(pruned - dense_ood[0], 4)}

    def agreement_columns(mask: PruneMask) -> Row:
        if not reference:
            reference.append(dense_reference(handle, ho, n_prompts=AGREE_PROMPTS, n_new=AGREE_NEW))
        a = agreement(handle, mask, ho, reference=reference[0])
        return {"top1_heldout": round(a.top1, 4), "greedy_heldout": round(a.greedy_prefix, 4)}

    for config, method in todo:
        key = f"{method}@{config}"
        mask_path = cached_mask_path(cache_dir, method, config)
        cached = None if args.report else load_cached_mask(mask_path, method, config, handle.geometry, results)
        if key in results and "ood_nll" not in results[key] and cached is not None:
            results[key].update(ood_columns(cached))
            results_path.write_text(json.dumps(results, indent=1))
        if key not in results:
            t, cpu = time.perf_counter(), time.process_time()
            if cached is not None:
                mask = cached
                select_s = mask.meta.get("bench_select_seconds", float("nan"))
                select_cpu = mask.meta.get("bench_select_cpu_seconds", float("nan"))
            else:
                mask = make_mask(handle, method, config, calib, args, cache_dir)
                # a cached layer search counts as long as it took
                select_s = time.perf_counter() - t + mask.meta.get("layer_search_reused_s", 0.0)
                select_cpu = time.process_time() - cpu + mask.meta.get("layer_search_reused_cpu_s", 0.0)
                mask.meta["bench_select_seconds"] = select_s
                mask.meta["bench_select_cpu_seconds"] = select_cpu
                mask.save(mask_path)
                save_tensors(calib.cache, tables_path)
            c, s = cost(handle, mask), mask.summary()
            results[key] = {
                "method": method, "config": config,
                "ppl_main": perplexity(handle, mask, main_protocol).perplexity,
                "ppl_heldout": heldout_perplexity(handle, mask, ho),
                "heads_removed": s["heads_pruned"], "ffn_removed": s["ffn_channels_pruned"],
                "blocks_removed": s["attn_blocks_pruned"] + s["ffn_blocks_pruned"],
                "params_removed_pct": round(100 * c.params_removed_fraction, 2),
                "compensated": mask.has_bias, "reconstructed": mask.has_refit, "select_s": round(select_s, 1),
                "select_cpu_min": round(select_cpu / 60, 2),
                **agreement_columns(mask), **ood_columns(mask),
                "settings": settings_of(mask),
            }
            results[key]["measured"] = time.strftime("%Y-%m-%d")
            results_path.write_text(json.dumps(results, indent=1))
        r = dict(results[key])
        r["ratio_main"] = r["ppl_main"] / dense_main.perplexity
        r["ratio_heldout"] = r["ppl_heldout"] / dense_ho
        rows.append(r)
        print(f"  {config:>8} {method:>40}: main {r['ppl_main']:10.2f} ({r['ratio_main']:6.2f}x)  held-out "
              f"{r['ppl_heldout']:10.2f} ({r['ratio_heldout']:6.2f}x)  top-1 {r.get('top1_heldout', float('nan')):.1%}  "
              f"greedy {r.get('greedy_heldout', float('nan')):.1%}  params -{r['params_removed_pct']:.1f}%  "
              f"select {r['select_s']:.0f} s", flush=True)

    order = {c: i for i, c in enumerate(CONFIGS)}
    rows.sort(key=lambda r: order.get(r["config"], len(order)))
    cols = ["config", "method", "ppl_main", "ratio_main", "ppl_heldout", "ratio_heldout", "top1_heldout",
            "greedy_heldout", "ood_nll", "ood_nll_delta", "settings", "heads_removed",
            "ffn_removed", "blocks_removed", "params_removed_pct", "compensated", "reconstructed", "select_s",
            "select_cpu_min"]
    # Rows cached before these columns existed leave them empty.
    fresh = [{k: (round(r[k], 3) if isinstance(r.get(k), float) else r.get(k, "")) for k in cols} for r in rows]
    for r, row in zip(rows, fresh):
        row["measured"] = r.get("measured", "")
    write_rows(merge_rows(csv_path, fresh, cols + ["measured"]), csv_path)
    print(f"\nwrote {csv_path} (dense main {dense_main.perplexity:.3f}, held-out {dense_ho:.3f})")
    print_tables(rows)


def settings_of(mask: PruneMask) -> str:
    """The settings a mask's method used, as far as its meta records them (allocation, input re-fits, damping)."""
    r = mask.meta.get("reconstruction", {})
    calibration = str(mask.meta.get("calibration", "")).split()
    parts = [f"calibration={calibration[1]}" if len(calibration) > 1 and calibration[1] != "wikitext" else "",
             f"allocation={mask.meta['allocation']}" if "allocation" in mask.meta else "",
             f"inputs={r['inputs']}" if "inputs" in r else "", f"damp={r['damp']}" if "damp" in r else "",
             f"target={r['target']}" if "target" in r else ""]
    return " ".join(p for p in parts if p)


def merge_rows(path: Path, fresh: list[Row], cols: list[str]) -> list[Row]:
    """The CSV's rows with `fresh` ones replacing those of the same (config, method), new ones appended.

    So a run of a few methods or configurations updates its rows and keeps every other row the file holds
    (the `measured` column dates each row; older rows without it were measured before it existed).
    """
    import csv

    old: list[Row] = list(csv.DictReader(path.open())) if path.exists() else []
    by_key = {(r["config"], r["method"]): r for r in fresh}
    merged = [by_key.pop((r.get("config"), r.get("method")), r) for r in old]
    merged += list(by_key.values())
    order = {c: i for i, c in enumerate(CONFIGS)}
    merged.sort(key=lambda r: order.get(r["config"], len(order)))  # stable: methods keep their order
    return [{k: r.get(k, "") for k in cols} for r in merged]


def print_tables(rows: list[Row]) -> None:
    """Markdown tables: perplexity (ratio to dense) per method x configuration, main then held-out."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["config"]): r for r in rows}
    for which in ("main", "heldout"):
        print(f"\n{'main protocol' if which == 'main' else 'held-out'}: perplexity (x dense)")
        print("| method | " + " | ".join(configs) + " |")
        print("|---" * (len(configs) + 1) + "|")
        for m in methods:
            cells = [f"{by[m, c]['ppl_' + which]:,.1f} ({by[m, c]['ratio_' + which]:.2f}x)" if (m, c) in by else "-"
                     for c in configs]
            print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
