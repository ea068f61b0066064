"""`python -m headlab export`: a smaller checkpoint on disk, from a mask file or a size target.

    python -m headlab export --mask mask.json --out pruned/              # any mask (layout auto)
    python -m headlab export --keep 0.8 --route depth --out pruned-depth/ # drop whole layers
    python -m headlab export --keep 0.8 --route width --out pruned-width/ # same size, narrower layers
    python -m headlab export --mask mask.json --format gguf --gguf-type q8_0 --out pruned-gguf/   # for llama.cpp

A width target is reached by reconstruction (headlab.engine.pruning.strategies.reconstruct: structured OBS
per layer, per-layer counts by --allocation, chosen on validation text, the kept weights re-solved); with --layout
uniform every layer loses the same
units, so plain transformers loads the folder (Llama: its config's bias switches carry the re-fitted
biases; families without such a switch are fitted without a bias). --criterion picks units by a
criterion instead, without reconstruction. --method names a depth method (e.g. ablation-iterative-refit).
"""

from __future__ import annotations

import argparse
import time

from headlab.engine.cli.common import (
    Subparsers,
    add_calibration_args,
    add_model_args,
    add_protocol_args,
    calibration_from_args,
    count_or_fraction,
    load_handle,
    load_mask,
    progress_bar,
    protocol_from_args,
    stage,
)
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.export.deploy import EXPORT_TYPES, export_gguf
from headlab.engine.export.write import LAYOUTS, export, zip_folder
from headlab.engine.pruning.size_target import ROUTES, reach_size
from headlab.engine.pruning.strategies.depth import DEPTH_METHODS, depth_prune
from headlab.engine.pruning.strategies.reconstruct import (
    ALLOCATIONS,
    DEPTH_REFIT_METHODS,
    REFIT_TEXTS,
    depth_refit_prune,
    width_by_reconstruction,
)
from headlab.engine.runtime.cost import cost

__all__ = ["cmd_export", "register"]


def _ffn_align(args: argparse.Namespace) -> int:
    """FFN channels per kept block: --ffn-align, else a GGUF q8_0 export's block (32), else 1 (no rounding)."""
    if args.ffn_align:
        return args.ffn_align
    if args.format != "gguf":
        return 1
    return 32 if args.gguf_type == "q8_0" else 256 if args.gguf_type.startswith(("Q4_K", "Q5_K", "Q6_K")) else 1


def _size_target_mask(args: argparse.Namespace, handle: ModelHandle) -> PruneMask:
    """The mask that brings the model to --keep of its parameters along --route."""
    keep = count_or_fraction(args.keep)
    calib = calibration_from_args(args, handle)
    if args.method and args.route == "depth":
        if not isinstance(keep, float):
            raise ValueError("--method takes --keep as a fraction of the parameters (0-1)")
        with progress_bar(f"depth ({args.method})") as cb:
            if args.method in DEPTH_REFIT_METHODS:
                mask = depth_refit_prune(handle, keep, args.method, calib, n_texts=args.refit_texts,
                                         window=args.refit_window, damp=args.refit_damp, progress=cb)
            else:
                mask = depth_prune(handle, keep, args.method, calib, progress=cb)
        c = cost(handle, mask)
        print(f"size target: depth ({args.method}): {c.params_kept:,} of {c.params_total:,} parameters "
              f"({100 * c.params_kept / c.params_total:.1f}%); layers dropped {mask.meta.get('layers_dropped')}")
    elif args.route == "width" and not args.criterion:
        with progress_bar("reconstructing (width)") as cb:
            uniform = args.layout == "uniform"
            r = width_by_reconstruction(handle, keep, calib, uniform=uniform, n_texts=args.refit_texts,
                                        ffn_align=_ffn_align(args), progress=cb, allocation=args.allocation,
                                        window=args.refit_window,
                                        even_groups=not uniform and args.format == "gguf" and not args.uneven_groups)
        mask = r.mask
        print(f"size target: {r.describe()}")
    else:
        with progress_bar(f"scoring ({args.route})") as cb:
            r = reach_size(handle, keep, route=args.route, criterion=args.criterion, texts=calib.texts, progress=cb)
        mask = r.mask
        print(f"size target: {r.describe()}")
    mask.meta.update({"model": handle.name, "calibration": args.calibration, "n_texts": len(calib.texts)})
    return mask


def cmd_export(args: argparse.Namespace) -> int:
    """Physically prune by --mask or to --keep, write the checkpoint and report parity and perplexity."""
    if (args.mask is None) == (args.keep is None):
        raise ValueError("give exactly one of --mask (a mask file) or --keep (a size target)")
    if args.refit_damp is not None and not (args.route == "depth" and args.method in DEPTH_REFIT_METHODS
                                            and args.keep is not None and args.refit_damp >= 0):
        raise ValueError(f"--refit-damp (>= 0, got {args.refit_damp}) sets the ridge of a depth -refit method's "
                         "stand-ins: give it with --keep, --route depth and --method <depth method>-refit")
    handle = load_handle(args)
    mask = load_mask(args.mask, handle) if args.mask else _size_target_mask(args, handle)
    if args.save_mask:
        mask.save(args.save_mask)
        print(f"wrote mask to {args.save_mask}")
    t = time.perf_counter()
    if args.format == "gguf":
        return _report_gguf(export_gguf(handle, mask, args.out, args.gguf_type, overwrite=args.overwrite,
                                        evaluate=not args.no_eval, protocol=protocol_from_args(args), stage=stage),
                            time.perf_counter() - t)
    r = export(handle, mask, args.out, layout=args.layout, overwrite=args.overwrite, evaluate=not args.no_eval,
               protocol=protocol_from_args(args), stage=stage)
    m = r.manifest
    print(f"exported to {r.folder} ({r.layout} layout, {r.bytes_on_disk / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t:.1f} s)")
    print(f"parameters: {r.params_before:,} -> {r.params_after:,} ({100 * m['params']['removed_fraction']:.1f}% "
          f"removed); ideal speedup (FLOPs/token at 512) {m['flops_per_token_512']['ideal_speedup']:.2f}x")
    print(f"pruned vs masked logits: max |diff| {m['parity']['max_abs_logit_diff']:.2e}")
    _print_perplexity(m["perplexity"], "perplexity")
    if r.layout != "uniform":
        print(f"per-layer sizes recorded ({m['why_not_uniform']})")
    for note in m["surgery"]["notes"][:8]:
        print(f"  {note}")
    print(f"load it with: {r.load_hint}")
    if "sentence_transformers" in m["load"]:
        print(f"as a sentence encoder: --encoder {r.folder}, or {m['load']['sentence_transformers']}")
    if args.zip:
        print(f"zipped to {zip_folder(r.folder)}")
    return 0


def _print_perplexity(p: dict | None, label: str) -> None:
    """The manifest's perplexity before/after, when it was measured."""
    if p:
        print(f"{label}: {p['before']['perplexity']:.2f} -> {p['after']['perplexity']:.2f} "
              f"({p['ratio']:.2f}x) on {p['protocol']}")


def _report_gguf(r, seconds: float) -> int:
    m, g = r.manifest, r.gguf
    print(f"exported to {r.folder}: {m['gguf']['file']} ({g.arch} architecture, {g.out_type}, "
          f"{g.bytes / 2**20:.1f} MiB, {seconds:.1f} s)")
    print(f"parameters: {r.params_before:,} -> {r.params_after:,}; written to the GGUF {g.params_written:,} "
          f"({g.extra_params:,} added for llama.cpp: duplicated K/V heads of uneven GQA groups, stand-in FFNs)")
    print(f"pruned vs masked logits: max |diff| {m['parity']['max_abs_logit_diff']:.2e}; tokenizer {g.tokenizer}")
    _print_perplexity(m["perplexity"], "perplexity (HeadLab)")
    for f in g.fallbacks[:8]:
        print(f"  kept at F16: {f}")
    for what, command in m["run"].items():
        print(f"  {what}: {command}")
    return 0


def register(sub: Subparsers) -> None:
    """Add the export verb."""
    p = sub.add_parser("export", help="physically prune and write a smaller Hugging Face checkpoint")
    add_model_args(p)
    add_calibration_args(p)
    add_protocol_args(p)
    p.add_argument("--out", required=True, help="new folder to write (refused if it exists and is not empty)")
    p.add_argument("--mask", help="mask JSON written by `prune` or the app")
    p.add_argument("--keep", type=float, help="instead of a mask: fraction (0-1) or count of parameters to keep")
    p.add_argument("--route", default="depth", choices=ROUTES, help="with --keep: drop layers or narrow them")
    p.add_argument("--criterion", default=None,
                   help="with --keep: for depth block_influence (default), block_ppl or taylor_plus; for width "
                        "gradient, magnitude or activation instead of reconstruction (the default)")
    p.add_argument("--method", default=None, choices=[*DEPTH_METHODS, *DEPTH_REFIT_METHODS],
                   help="with --keep and --route depth: a depth method (-refit: the layers around each gap re-fitted)")
    p.add_argument("--refit-texts", type=int, default=REFIT_TEXTS,
                   help="calibration texts the reconstruction fits on (at least --n-texts); 512 re-fits better "
                        "(bench/results/choices.csv) and takes about 5x as long")
    p.add_argument("--refit-window", type=int, default=0,
                   help="with --route width or a depth -refit method, and the wikitext calibration: fit on the file's "
                        "running text over the "
                        "span of --refit-texts paragraphs, in windows of this many tokens (headings and short "
                        "paragraphs too: 694 paragraphs' span in windows of 512 is about 146,000 tokens for SmolLM2, "
                        "against 81,000 in the paragraphs alone); 0 = one text per paragraph")
    p.add_argument("--refit-damp", type=float, default=None,
                   help="with a depth -refit method: the stand-ins' ridge damping, a fraction of the mean Gram "
                        "diagonal (default 0.01; on the whole fit region as 512-token windows validation chose less: "
                        "bench/results/choices.csv)")
    p.add_argument("--allocation", default="auto", choices=[a for a in ALLOCATIONS if a != "uniform"],
                   help="with --keep --route width (per layer): how many heads and channels each layer loses; auto "
                        "is the allocation chosen on validation text (bench/results/choices.csv); flap is the "
                        "fastest, kl / kl-joint measure each layer's KL first (minutes more)")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="uniform = standard config (refused if layers differ); per_layer = sizes in config.json")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"),
                   help="hf = a Hugging Face folder (default); gguf = one GGUF file for llama.cpp / Ollama (Llama "
                        "family), with a Modelfile")
    p.add_argument("--gguf-type", default="f16", choices=EXPORT_TYPES,
                   help="with --format gguf: the weights' type; K-quants (Q4_K_M, ...) are made from an f16 file by "
                        "llama.cpp's llama-quantize (`make llama-cpp` builds it, or set HEADLAB_LLAMA_CPP)")
    p.add_argument("--ffn-align", type=int, default=0,
                   help="with --keep --route width: every layer keeps a multiple of this many FFN "
                        "channels, chosen at those counts (32 for Q8_0, 256 for llama.cpp's K-quants such as "
                        "Q4_K_M; default 32 for --format gguf --gguf-type q8_0, 256 for a K-quant, else none)")
    p.add_argument("--uneven-groups", action="store_true",
                   help="with --format gguf --keep --route width (per layer): let a layer's GQA groups keep "
                        "different numbers of query heads (the file then holds duplicated K/V or zero query rows, "
                        "counted in the manifest); by default every group of a layer keeps as many")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder goes only after the new one is complete)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity before/after")
    p.add_argument("--save-mask", help="also write the mask used to this JSON file")
    p.add_argument("--zip", action="store_true", help="also write <out>.zip")
    p.set_defaults(func=cmd_export)
