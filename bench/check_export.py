"""Independent check of a quality row: export its cached mask, reload the folder, measure it again.

    python bench/check_export.py "obs[inputs=all,n_texts=694,window=512]" width20
    python bench/check_export.py "ablation-iterative-refit[inputs=none,n_texts=694,window=512,damp=0.0001]" depth20

The mask bench_quality (or bench_choices) cached for METHOD at CONFIG is physically pruned and written by
headlab.engine.export.write.export (surgery: the re-fitted weights go into the copy), reloaded from the folder by
headlab.engine.models.load.load_pruned (files checked against the manifest), and scored on the main protocol
(WikiText-2 test, the pinned windows) with no mask: the figure the exported model gives, next to the dense model
and the in-engine masked one. The two agree to the printed digits when surgery is exact. Nothing is made: a mask
that is not cached is an error (run bench_quality or bench_choices first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.bench_quality import bench_cache, cached_mask_path
from headlab.engine.core.mask import PruneMask
from headlab.engine.export.write import export
from headlab.engine.models.load import load_model, load_pruned
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, perplexity


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", help='a bench_quality method name, e.g. "obs[inputs=all]"')
    ap.add_argument("config", help="heads30, heads50, width20, depth20, ...")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model(args.model)
    path = cached_mask_path(bench_cache(args.model, False), args.method, args.config)
    if not path.exists():
        raise SystemExit(f"no cached mask for {args.method}@{args.config} ({path}); run bench_quality first")
    mask = PruneMask.load(path, handle.geometry)
    with tempfile.TemporaryDirectory(prefix="headlab-check-") as tmp:
        t = time.perf_counter()
        result = export(handle, mask, Path(tmp) / "model", evaluate=False)
        print(f"exported ({result.layout} layout): {result.params_after:,} of {result.params_before:,} parameters, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        reloaded = load_pruned(Path(tmp) / "model")
        params = sum(p.numel() for p in reloaded.model.parameters())
        if params != result.params_after:
            raise SystemExit(f"the reloaded model has {params:,} parameters, the export wrote {result.params_after:,}")
        dense = perplexity(handle, None, DEFAULT_PROTOCOL).perplexity
        again = perplexity(reloaded, None, DEFAULT_PROTOCOL).perplexity
        engine = perplexity(handle, mask, DEFAULT_PROTOCOL).perplexity
    print(f"main protocol: dense {dense:.3f}; exported and reloaded {again:.3f} ({again / dense:.4f}x); "
          f"in the engine {engine:.3f} ({engine / dense:.4f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
