"""Dense vs exported pruned models: tokens/s, measured speedup vs the ideal, and perplexity.

    python bench/bench_pruned_speed.py [--threads N] [--keeps 0.8,0.65] [--obs-keeps 0.8] [--quick]

For each size (fraction of parameters kept) the depth route drops whole layers ranked by a
depth criterion; the width route then narrows every layer (heads + FFN channels, uniform)
to the same parameter count, so the two are compared at equal size. The reconstructed rows
(`--obs-keeps`) are what `python -m headlab export --keep K --route width` writes: structured OBS
with the kept weights re-solved, per layer where FLAP cuts ("obs", the default export, reloaded by
headlab.engine.models.load.load_pruned) and the same units in every layer ("obs uniform", `--layout
uniform`, reloaded by plain transformers); their masks are cached under
~/.cache/headlab/bench/pruned_speed/ (minutes each to compute). Each pruned model is
exported to a temporary folder and reloaded from it, so the timed model is the artifact a
user gets. Timings: a forward over `--seq` tokens (prefill) and greedy generation of
`--gen` new tokens with the KV cache, after a warm-up, median of `--repeats` runs taken in
round-robin over the models so that CPU load drifts hit them alike. Ideal speedup = dense
FLOPs / pruned FLOPs per token at the same sequence length (headlab.engine.runtime.cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.machine import cpu_name
from headlab.engine.core.csvfile import write_rows
from headlab.engine.export.write import export
from headlab.engine.models.load import load_model, load_pruned
from headlab.engine.pruning.size_target import reach_size, width_mask
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, eval_windows, perplexity


@dataclass
class Entry:
    label: str
    route: str
    keep: float
    handle: object
    params: int
    flops: int
    criterion: str = ""
    detail: str = ""
    fwd_s: list[float] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)
    ppl: float | None = None


@torch.no_grad()
def _time_forward(handle, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    handle.model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def _time_generate(handle, prompt: torch.Tensor, n_new: int) -> float:
    t = time.perf_counter()
    out = handle.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + n_new
    return elapsed


def _exported(source, mask, root: Path, name: str):
    folder = root / name
    export(source, mask, folder, evaluate=False)
    return load_pruned(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--keeps", default="0.8,0.65", help="fractions of parameters to keep")
    ap.add_argument("--depth-criterion", default="block_influence")
    ap.add_argument("--width-criterion", default="gradient")
    ap.add_argument("--obs-keeps", default="0.8", help="sizes of the reconstructed rows (empty: none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seq", type=int, default=512, help="tokens in the timed forward")
    ap.add_argument("--gen", type=int, default=64, help="new tokens in the timed generation")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--windows", type=int, default=DEFAULT_PROTOCOL.n_windows, help="perplexity windows (0: skip)")
    ap.add_argument("--quick", action="store_true", help="smoke run: one size, short sequences, 2 repeats")
    ap.add_argument("--csv", default="bench/results/pruned_speed.csv")
    args = ap.parse_args()
    if args.quick:
        args.keeps, args.seq, args.gen, args.repeats, args.windows = "0.8", 128, 16, 2, 2
        args.obs_keeps = ""
    torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keeps.split(",")]

    source = load_model(args.model)
    ids = eval_windows(source, PerplexityProtocol(window=args.seq, stride=args.seq, n_windows=1))[0][:1]
    prompt = ids[:, : args.prompt_tokens]
    dense_cost = cost(source, seq_len=args.seq)
    entries = [Entry("dense", "-", 1.0, source, dense_cost.params_total, dense_cost.flops_dense)]
    tmp = tempfile.TemporaryDirectory(prefix="headlab-bench-")
    root = Path(tmp.name)
    t0 = time.perf_counter()
    head_scores, ffn_scores = _width_scores(source, args.width_criterion)
    for keep in keeps:
        d = reach_size(source, keep, route="depth", criterion=args.depth_criterion)
        # Width is fitted to the depth model's exact size: equal-size comparison.
        w_mask, w_detail = width_mask(source, d.params_kept, head_scores, ffn_scores)
        w_mask.meta.update({"criterion": args.width_criterion, "route": "width"})
        for route, mask, crit, detail in (("depth", d.mask, d.criterion, d.detail),
                                          ("width", w_mask, args.width_criterion, w_detail)):
            c = cost(source, mask, seq_len=args.seq)
            h = _exported(source, mask, root, f"{route}-{keep}")
            assert sum(p.numel() for p in h.model.parameters()) == c.params_kept
            entries.append(Entry(f"{route} {keep:.0%}", route, keep, h, c.params_kept, c.flops_kept, crit, detail))
            print(f"# {route} @ keep {keep:.0%} ({crit}): {detail}", flush=True)
    for keep in [float(k) for k in args.obs_keeps.split(",") if k]:
        for uniform in (False, True):
            mask, detail = _obs_mask(source, keep, uniform)
            label = f"obs{' uniform' if uniform else ''} {keep:.0%}"
            c = cost(source, mask, seq_len=args.seq)
            h = _exported(source, mask, root, label.replace(" ", "-"))
            params = sum(p.numel() for p in h.model.parameters())  # + the zero biases a uniform Llama export switches on
            assert 0 <= params - c.params_kept <= 8 * source.geometry.hidden * source.geometry.n_layers
            entries.append(Entry(label, "width", keep, h, params, c.flops_kept, "obs", detail))
            print(f"# {label}: {detail}", flush=True)
    t_build = time.perf_counter() - t0

    for e in entries:  # warm-up (allocator, threads, lazy inits)
        _time_forward(e.handle, ids)
        _time_generate(e.handle, prompt, min(args.gen, 8))
    for _ in range(args.repeats):
        for e in entries:
            e.fwd_s.append(_time_forward(e.handle, ids))
            e.gen_s.append(_time_generate(e.handle, prompt, args.gen))
    protocol = None
    if args.windows:
        protocol = PerplexityProtocol(n_windows=args.windows)
        for e in entries:
            e.ppl = perplexity(e.handle, None, protocol).perplexity

    dense = entries[0]
    fwd0, gen0 = statistics.median(dense.fwd_s), statistics.median(dense.gen_s)
    print(f"\n# bench_pruned_speed: {source.name}, {torch.get_num_threads()} torch threads on {cpu_name()} "
          f"({os.cpu_count()} logical cores), torch {torch.__version__}, {source.dtype}")
    print(f"# forward: {args.seq} tokens (use_cache=False); generation: {args.prompt_tokens}-token prompt + "
          f"{args.gen} greedy tokens with KV cache; warm-up 1, median of {args.repeats}, round-robin")
    print(f"# ideal = dense FLOPs / pruned FLOPs per token at {args.seq} tokens; built and exported in {t_build:.0f} s")
    if protocol:
        print(f"# perplexity: {protocol.describe(source.name)}")
    print("# timings on a shared machine are noisy: compare ratios within this run only\n")
    print("| model | params | ideal speedup | forward tok/s | forward speedup | gen tok/s | gen speedup | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for e in entries:
        fwd, gen = statistics.median(e.fwd_s), statistics.median(e.gen_s)
        ideal = dense.flops / e.flops
        row = {"model": e.label, "route": e.route, "keep": e.keep, "criterion": e.criterion, "detail": e.detail,
               "params": e.params, "params_removed": round(1 - e.params / dense.params, 4),
               "ideal_speedup": round(ideal, 3), "forward_tok_s": round(args.seq / fwd, 1),
               "forward_speedup": round(fwd0 / fwd, 3), "gen_tok_s": round(args.gen / gen, 1),
               "gen_speedup": round(gen0 / gen, 3), "perplexity": None if e.ppl is None else round(e.ppl, 2)}
        rows.append(row)
        ppl = "-" if e.ppl is None else f"{e.ppl:,.1f}"
        fwd_cell = f"{row['forward_speedup']:.2f}x ({row['forward_speedup'] / ideal:.0%} of ideal)"
        gen_cell = f"{row['gen_speedup']:.2f}x ({row['gen_speedup'] / ideal:.0%} of ideal)"
        print(f"| {e.label} | {e.params / 1e6:.1f} M (-{100 * row['params_removed']:.1f}%) | {ideal:.2f}x | "
              f"{row['forward_tok_s']:,.0f} | {fwd_cell} | {row['gen_tok_s']:,.1f} | {gen_cell} | {ppl} |")
    print(f"\nwrote {write_rows(rows, args.csv)}")
    tmp.cleanup()


def _obs_mask(source, keep: float, uniform: bool):
    """(mask, detail) of headlab.engine.pruning.strategies.reconstruct.width_by_reconstruction, cached on disk."""
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.models.load import cache_dir
    from headlab.engine.pruning.strategies import Calibration
    from headlab.engine.pruning.strategies.reconstruct import width_by_reconstruction

    path = (cache_dir() / "bench" / "pruned_speed" / source.name.replace("/", "_")
            / f"obs_{'uniform' if uniform else 'per_layer'}_{keep:.3f}.json")
    if path.exists():
        mask = PruneMask.load(path, source.geometry)
        return mask, mask.meta.get("bench_detail", "")
    print(f"# reconstructing {keep:.0%} by width ({'uniform' if uniform else 'per layer'}; minutes)...", flush=True)
    r = width_by_reconstruction(source, keep, Calibration.shipped("wikitext", 32), uniform=uniform)
    r.mask.meta["bench_detail"] = r.detail
    path.parent.mkdir(parents=True, exist_ok=True)
    r.mask.save(path)
    return r.mask, r.detail


def _width_scores(source, criterion: str):
    """(head scores, FFN scores) of `criterion` on the default calibration set."""
    from headlab.engine.data.datasets import calibration_texts
    from headlab.engine.importance.registry import score

    s = score(source, calibration_texts("wikitext", 32), [criterion])[0][criterion]
    return s.heads, s.ffn


if __name__ == "__main__":
    main()
