"""Attention maps of long prompts: the eager path vs SDPA to the layer + a blockwise Q.K, on the default model.

    python bench/bench_attention.py [--model NAME] [--lengths 512 1024 2048 4096] [--layers 2 29]
                                    [--bins 64] [--reduce mass] [--threads N] [--skip-old]
                                    [--out bench/results/attention.csv]

For each prompt length T (WikiText-2 tokens, exactly T) and each layer l:
- old first: the previous implementation: one eager forward stopped after layer l (every layer
  before it materialises H x T x T probabilities), then `pool_attention`. It keeps nothing, so a
  layer switch costs the same: old switch = old first.
- new first: `attention_map(..., cache=LayerInputCache())` on a prompt that cache has not seen:
  SDPA through layers 0..l-1 (the rest of the forward carries on in the background), then layer
  l's probabilities blockwise from its Q and K, pooled as they are formed.
- new switch: after that forward has finished, the map of the *other* layer from the cached
  layer inputs (one layer's Q.K): the switch to layer 29 is timed after a first map of layer 2,
  and the other way round.
- sdpa forward: one plain forward of the model body (no LM head) with SDPA over the same tokens,
  the yardstick of the targets. fill: time until the background forward has every layer.
Peak memory: the growth of the process's peak RSS (VmHWM, reset before each step) over the RSS
before it; for "new first" until the background forward has finished. Targets at 4,096 tokens on
a 2-core CPU: new first of the last layer <= 1.3 x sdpa forward, of layer 2 a few seconds, any
switch <= 2 s. Writes a CSV and prints a markdown table. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from headlab.engine.data.datasets import read_wikitext  # noqa: E402
from headlab.engine.models.load import load_model  # noqa: E402
from headlab.engine.runtime.attention_maps import attention_map, eager_layer_probs, pool_attention  # noqa: E402
from headlab.engine.runtime.layer_inputs import LayerInputCache, sdpa_view  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024


def measured(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak RSS growth in MiB) of fn()."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    return seconds, max(0, _status("VmHWM") - before) / 2**20


def prompt(handle, n_tokens: int) -> tuple[str, torch.Tensor]:
    """A WikiText-2 text of at least n_tokens tokens and its first n_tokens ids."""
    text = read_wikitext()
    while len(handle.tokenizer(text[: 8 * n_tokens])["input_ids"]) < n_tokens:
        text = text + text
    text = text[: 8 * n_tokens]
    return text, handle.tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="alias, folder or hub id (default: the shipped SmolLM2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: 2 and the last layer")
    ap.add_argument("--bins", type=int, default=64)
    ap.add_argument("--reduce", default="mass", choices=["mass", "max"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-old", action="store_true", help="skip the eager path (minutes at 4,096 tokens)")
    ap.add_argument("--out", type=Path, default=RESULTS / "attention.csv")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    handle = load_model(args.model)
    g = handle.geometry
    layers = args.layers or [min(2, g.n_layers - 1), g.n_layers - 1]
    if any(not 0 <= layer < g.n_layers for layer in layers):
        raise SystemExit(f"--layers must lie in 0..{g.n_layers - 1}")
    print(f"model {handle.name}: {g.n_layers} layers x {g.n_heads} heads ({g.n_kv_heads} KV); "
          f"torch threads {torch.get_num_threads()}; {args.bins} bins, {args.reduce}")
    opts = dict(max_bins=args.bins, reduce=args.reduce)

    warm_text, warm_ids = prompt(handle, 64)  # load kernels and code paths once
    attention_map(handle, warm_text, layers[-1], max_tokens=64, **opts)
    with torch.no_grad():
        sdpa_view(handle).base_model(input_ids=warm_ids, use_cache=False)
    if not args.skip_old:
        pool_attention(eager_layer_probs(handle, warm_ids, layers[-1]), args.bins, args.reduce)

    rows = []
    for T in args.lengths:
        text, ids = prompt(handle, T)
        with torch.no_grad():
            body = sdpa_view(handle).base_model  # the view's transformer body: no LM head
            forward_s, forward_mib = measured(lambda: body(input_ids=ids, use_cache=False))
        for layer in layers:
            other = next((x for x in layers if x != layer), layer)
            old_s = old_mib = float("nan")
            if not args.skip_old:
                old_s, old_mib = measured(
                    lambda: pool_attention(eager_layer_probs(handle, ids, layer), args.bins, args.reduce))
            cache, first = LayerInputCache(), {}

            def first_map_then_fill() -> None:
                t = time.perf_counter()
                attention_map(handle, text, layer, max_tokens=T, cache=cache, **opts)
                first["s"] = time.perf_counter() - t
                cache.wait()  # the background forward holds memory until it finishes: count it

            fill_s, first_mib = measured(first_map_then_fill)
            first_s = first["s"]
            switch_s, switch_mib = measured(
                lambda: attention_map(handle, text, other, max_tokens=T, cache=cache, **opts))
            row = {"tokens": T, "layer": layer, "old_first_s": old_s, "old_switch_s": old_s, "old_peak_mib": old_mib,
                   "new_first_s": first_s, "new_fill_s": fill_s, "new_first_peak_mib": first_mib,
                   "switch_to": other, "new_switch_s": switch_s, "new_switch_peak_mib": switch_mib,
                   "sdpa_forward_s": forward_s, "sdpa_forward_peak_mib": forward_mib,
                   "cache_mib": cache.nbytes / 2**20}
            rows.append(row)
            print(f"T={T:>5} layer {layer:>2}: old {old_s:7.2f} s ({old_mib:6.0f} MiB) | new first {first_s:6.2f} s, "
                  f"fill {fill_s:6.2f} s ({first_mib:5.0f} MiB) | switch to {other} {switch_s:5.2f} s "
                  f"({switch_mib:4.0f} MiB) | sdpa forward {forward_s:6.2f} s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print("\n| tokens | layer | old first = old switch (s) | old peak (MiB) | new first (s) | first / sdpa forward "
          "| new switch to (s) | new peak (MiB) | sdpa forward (s) | cached inputs (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['layer']} | {r['old_first_s']:.2f} | {r['old_peak_mib']:.0f} "
              f"| {r['new_first_s']:.2f} | {r['new_first_s'] / r['sdpa_forward_s']:.2f} "
              f"| {r['switch_to']}: {r['new_switch_s']:.2f} | {max(r['new_first_peak_mib'], r['new_switch_peak_mib']):.0f} "
              f"| {r['sdpa_forward_s']:.2f} | {r['cache_mib']:.0f} |")
    longest = [r for r in rows if r["tokens"] == max(args.lengths)]
    last = [r for r in longest if r["layer"] == g.n_layers - 1]
    early = [r for r in longest if r["layer"] != g.n_layers - 1]
    print(f"\ntargets at {max(args.lengths)} tokens: "
          + "; ".join([*(f"first map of layer {r['layer']} / sdpa forward = "
                         f"{r['new_first_s'] / r['sdpa_forward_s']:.2f} (<= 1.3)" for r in last),
                       *(f"first map of layer {r['layer']} = {r['new_first_s']:.2f} s (a few s)" for r in early),
                       f"slowest switch = {max(r['new_switch_s'] for r in longest):.2f} s (<= 2)"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
