"""An independent check of bench_dynamic's importance-network perplexity: the same windows scored two ways.

    python bench/check_dynamic.py [--target 0.5] [--windows 2]

(a) the way bench_dynamic measures it: a batched forward of the Hugging Face model with the network's masks
    applied by hooks (headlab.engine.dynamic.ipn.apply_ipn);
(b) token by token through the sparse decode loop (headlab.engine.dynamic.decode.sparse_nll): the KV cache, the
    Llama adapter's own decode step, and the gathered FFN kernel reading only each token's kept channels.
The two share the network and the model, nothing else. The network is the one bench_dynamic trained and
cached for --target with its default settings (the rotated sketch, 100 steps; its folder is named by the digest of
every setting, bench_dynamic.network_folder), or --network FOLDER; the untrained one when none is cached.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.bench_dynamic import _cache_dir, network_folder
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.choosers import IPNChooser
from headlab.engine.dynamic.decode import sparse_nll
from headlab.engine.dynamic.ipn import IPNConfig, apply_ipn, load_ipn, untrained_ipn
from headlab.engine.models.load import load_model
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, eval_windows, window_nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=2, help="protocol windows to score (512 tokens each)")
    ap.add_argument("--network", default=None, help="a saved network's folder (default: bench_dynamic's at --target)")
    ap.add_argument("--steps", type=int, default=100, help="the training steps of bench_dynamic's network")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    handle = load_model(None, dtype="float32")
    if args.network:
        folder = Path(args.network)
    else:
        cfg = IPNConfig(target=args.target, steps=args.steps, n_windows=8)
        folder = network_folder(_cache_dir() / "dynamic-ipn", handle, cfg,
                                calibration_ids(handle, window=256, n_windows=8))
    ipn = load_ipn(handle, folder) if (folder / "ipn.json").exists() else untrained_ipn(handle, args.target)
    which = f"trained ({folder})" if (folder / "ipn.json").exists() else "untrained"
    windows, _ = eval_windows(handle, DEFAULT_PROTOCOL)
    windows = windows[: args.windows]
    t = time.perf_counter()
    total = count = 0.0
    with torch.no_grad(), apply_ipn(handle, ipn):
        for w in windows:
            s, c = window_nll(handle.model(input_ids=w[None]).logits, w[None], torch.ones(1, dtype=torch.long))
            total, count = total + float(s), count + c
    hooks_ppl, hooks_s = math.exp(total / count), time.perf_counter() - t
    t = time.perf_counter()
    total = count = 0.0
    chooser = IPNChooser(handle, ipn)
    for w in windows:
        s, c = sparse_nll(handle, w[None], chooser)
        total, count = total + s, count + c
    decode_ppl, decode_s = math.exp(total / count), time.perf_counter() - t
    print(f"importance network at {args.target:.0%}, {which}; {len(windows)} windows of the pinned protocol, "
          f"{int(count)} scored tokens")
    print(f"  (a) hooks over a batched forward : perplexity {hooks_ppl:.4f}  ({hooks_s:.1f} s)")
    print(f"  (b) sparse decode, token by token: perplexity {decode_ppl:.4f}  ({decode_s:.1f} s)")
    print(f"  relative difference {abs(decode_ppl - hooks_ppl) / hooks_ppl:.2e}")


if __name__ == "__main__":
    main()
