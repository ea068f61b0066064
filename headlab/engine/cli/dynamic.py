"""`python -m headlab dynamic-calibrate | dynamic-train | dynamic-eval | dynamic-generate`: per-token sparsity.

    python -m headlab dynamic-calibrate --rule cats --target 0.5 --out runs/cats-50     # thresholds of a rule
    python -m headlab dynamic-train --target 0.5 --steps 120 --out runs/ipn-50           # the importance network
    python -m headlab dynamic-eval --load runs/ipn-50          # perplexity, sparsity, recall/precision vs the oracle
    python -m headlab dynamic-eval --method wina --target 0.5  # a rule calibrated on the spot
    python -m headlab dynamic-generate "What is a transformer?" --load runs/cats-50      # dense vs dynamic, tokens/s

A method is either `--load FOLDER` (saved by dynamic-calibrate, dynamic-train or the app; refused
for another model) or `--method NAME --target T`: a rule (oracle, exact, cats, teal, wina, teal-ffn,
wina-ffn) calibrated now, or `ipn`, the importance network with no training. Folders hold safetensors + JSON naming the
model and the sha256 of its weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from headlab.engine.cli.common import (
    Subparsers,
    add_model_args,
    add_protocol_args,
    is_main_process,
    load_handle,
    measure_perplexity,
    progress_bar,
    protocol_from_args,
    say,
    stage,
)
from headlab.engine.core.files import write_atomic_text
from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.decode import Generation
from headlab.engine.dynamic.ipn import IPN, IPNConfig, oracle_agreement, train_ipn
from headlab.engine.dynamic.methods import (
    METHOD_NAMES,
    PRECISIONS,
    DynamicMethod,
    calibrated,
    load_method,
    method_label,
    method_perplexity,
    prompt_room,
    save_method,
    side_by_side,
)
from headlab.engine.dynamic.rotation import ROTATED, SKETCHES
from headlab.engine.dynamic.rules import RULES, ThresholdsError
from headlab.engine.runtime.evaluate import eval_windows

__all__ = ["cmd_calibrate", "cmd_eval", "cmd_generate", "cmd_train", "register"]


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise ThresholdsError(f"--target is the fraction of FFN channels each token drops, in [0, 1); got {target}")


def _calibration(handle: ModelHandle, args: argparse.Namespace) -> torch.Tensor:
    """The calibration windows the --calib-window / --calib-windows flags ask for."""
    return calibration_ids(handle, window=args.calib_window, n_windows=args.calib_windows)


def _method(handle: ModelHandle, args: argparse.Namespace) -> DynamicMethod:
    """The method of --load, or --method calibrated to --target now (with a line on stderr)."""
    if args.load:
        method = load_method(handle, args.load)
        say(f"loaded {method_label(method)} from {args.load}")
        return method
    stage(f"calibrating {args.method} to {args.target:.0%} FFN sparsity on {args.calib_windows} x "
          f"{args.calib_window} tokens")
    return calibrated(handle, args.method, args.target, _calibration(handle, args))


def _early_checks(args: argparse.Namespace) -> None:
    """What can be refused before the model is loaded."""
    if args.load and args.method:
        raise ThresholdsError("give --load FOLDER or --method NAME, not both")
    if args.load:
        if not Path(args.load).is_dir():
            raise FileNotFoundError(f"{args.load} is not a folder: give one written by dynamic-calibrate, "
                                    f"dynamic-train or the app")
    elif args.method is None:
        raise ThresholdsError("say which method: --load FOLDER, or --method NAME --target T")
    else:
        _check_target(args.target)


def _write_json(path: str | None, result: dict) -> None:
    if path:
        write_atomic_text(path, json.dumps(result, indent=2, default=str))
        say(f"wrote {path}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a rule's per-layer thresholds to --target and save them."""
    _check_target(args.target)
    handle = load_handle(args)
    stage(f"calibrating {args.rule} on {args.calib_windows} x {args.calib_window} tokens")
    th = calibrated(handle, args.rule, args.target, _calibration(handle, args))
    measured = th.meta.get("measured_sparsity")
    print(f"{method_label(th)}: thresholds for {', '.join(sorted(th.values))} in {handle.geometry.n_layers} layers"
          + (f"; {measured:.1%} of the sparsified inputs zeroed on the calibration tokens" if measured is not None
             else ""))
    folder = save_method(handle, th, args.out)
    print(f"wrote {folder} (thresholds.safetensors, thresholds.json)")
    _write_json(args.json, {"method": th.rule, "target": th.target, "folder": str(folder), "meta": th.meta,
                            "thresholds": {s: t.tolist() for s, t in th.values.items()}})
    return 0


@contextmanager
def _training_bar(steps: int) -> Iterator[Callable[[dict], None]]:
    """A tqdm bar over the training steps, showing loss, KL and the sparsity reached."""
    bar = tqdm(total=steps, desc="training the importance network", unit="step", file=sys.stderr, leave=False,
               disable=not is_main_process())

    def update(entry: dict) -> None:
        bar.n = entry["step"]
        heads = "" if entry.get("head_sparsity") is None else f" heads {entry['head_sparsity']:.3f}"
        bar.set_postfix_str(f"loss {entry['loss']:.4f} KL {entry['kl']:.4f} "
                            f"FFN sparsity {entry['ffn_sparsity']:.3f}{heads}", refresh=True)
        if entry["step"] == steps:
            bar.close()
            stage("one threshold shift for the exact average sparsity on the calibration windows")

    try:
        yield update
    finally:
        bar.close()


def _ipn_config(args: argparse.Namespace) -> IPNConfig:
    return IPNConfig(target=args.target, heads=args.heads, head_target=args.head_target,
                     adaptive=not args.no_adaptive, steps=args.steps, batch=args.batch, window=args.calib_window,
                     n_windows=args.calib_windows, lr=args.lr, sparsity=args.sparsity_weight,
                     consistency=args.consistency, lora_rank=args.lora_rank, seed=args.seed, sketch=args.sketch)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the importance network to --target (model frozen) and save it (under torchrun: data-parallel, rank 0 saves)."""
    config = _ipn_config(args)  # bad settings fail before the model loads
    handle = load_handle(args)
    ids = _calibration(handle, args)
    stage(f"the dense model's outputs on {ids.shape[0]} x {ids.shape[1]} tokens, then {config.steps} steps")
    with _training_bar(config.steps) as on_step:
        run = train_ipn(handle, config, ids, on_step=on_step, world=args.world)
    # Every rank got here: write nothing before that (a rank that failed has ended the others' collectives).
    args.world.settle(None, "importance-network training")
    if not args.world.is_main:
        return 0
    last = run.history[-1] if run.history else {}
    print(f"trained the importance network in {run.seconds:.0f} s ({len(run.history)} steps): final loss "
          f"{last.get('loss', float('nan')):.4f}, KL {last.get('kl', float('nan')):.4f}; "
          f"{run.measured_sparsity:.1%} FFN sparsity on the calibration windows (target {config.target:.0%})")
    folder = save_method(handle, run.ipn, args.out, {"training": config.to_dict(), "history": run.history,
                                                    "seconds": run.seconds,
                                                    "measured_sparsity": run.measured_sparsity})
    print(f"wrote {folder} (ipn.safetensors, ipn.json)")
    _write_json(args.json, {"method": "ipn", "target": config.target, "folder": str(folder),
                            "config": config.to_dict(), "seconds": run.seconds,
                            "measured_sparsity": run.measured_sparsity, "history": run.history})
    return 0


def _print_agreement(rows) -> None:
    print(f"{'layer':>5}  {'recall':>6}  {'precision':>9}  {'kept':>6}   (vs the oracle's top-k per token, k at the "
          f"target)")
    for r in rows:
        print(f"{r.layer:>5}  {r.recall:6.3f}  {r.precision:9.3f}  {r.kept:6.1%}")


def cmd_eval(args: argparse.Namespace) -> int:
    """Dense vs dynamic perplexity, the sparsity reached per layer, and for an IPN its agreement with the oracle."""
    _early_checks(args)
    handle = load_handle(args)
    protocol = protocol_from_args(args)
    method = _method(handle, args)
    dense = measure_perplexity(handle, None, protocol, "dense")
    with progress_bar(f"perplexity ({method_label(method)})") as cb:
        dyn = method_perplexity(handle, method, protocol, progress=cb)
    ratio = dyn.result.perplexity / dense.perplexity
    print(f"dense:   {dense.describe()}")
    print(f"dynamic: {dyn.result.describe()}  ({ratio:.3f}x dense)")
    print(f"sparsity: {dyn.sparsity.describe()}")
    ffn = dyn.sparsity.per_layer.get("down", [])
    print("FFN channels zeroed per layer: " + " ".join(f"{f:.2f}" for f in ffn))
    result = {"method": method_label(method), "dense": dense.to_dict(), "dynamic": dyn.to_dict(), "ratio": ratio}
    if isinstance(method, IPN):
        stage("recall and precision against the oracle on the first evaluation windows")
        windows, _ = eval_windows(handle, protocol)
        rows = oracle_agreement(handle, method, windows[: min(2, windows.shape[0])])
        _print_agreement(rows)
        result["agreement"] = [r.to_dict() for r in rows]
    _write_json(args.json, result)
    return 0


def _text(handle: ModelHandle, g: Generation) -> str:
    return handle.tokenizer.decode(g.new_tokens, skip_special_tokens=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """Dense and dynamic greedy continuations of the prompt side by side, with decoded tokens per second."""
    _early_checks(args)
    handle = load_handle(args)
    ids = prompt_room(handle, args.prompt, args.max_new_tokens, chat=not args.raw)  # a bad prompt fails first
    method = _method(handle, args)
    stage(f"decoding {args.max_new_tokens} tokens, dense then {method_label(method)}"
          f"{' (FFN weights at 4 bits)' if args.precision == 'int4' else ''}")
    t = time.perf_counter()
    out = side_by_side(handle, method, ids, args.max_new_tokens, args.precision)
    say(f"({time.perf_counter() - t:.1f} s)")
    path = ("reads only each token's kept weights" if out.sparse_decode
            else "hooks on the dense layers, every weight still read, so its speed is no measure of the method")
    bits = ", FFN at 4 bits" if args.precision == "int4" else ""
    print(f"dense ({out.dense.decode_tokens_per_s:.1f} tokens/s{bits}):\n{_text(handle, out.dense)}\n")
    print(f"{method_label(method)} ({out.dynamic.decode_tokens_per_s:.1f} tokens/s{bits}, {out.speedup:.2f}x; "
          f"{path}):\n"
          f"{_text(handle, out.dynamic)}\n")
    print(f"the first {out.same_tokens} of {args.max_new_tokens} new tokens agree")
    if out.note:
        print(f"no sparse decoding: {out.note}")
    if out.dynamic.kept is not None:
        heads = "" if out.dynamic.heads is None else (f", query heads {out.dynamic.heads.float().mean():.1f} of "
                                                      f"{handle.geometry.n_heads}")
        print(f"read per decoded token, on average: FFN channels {out.dynamic.kept.float().mean():.0f} of "
              f"{handle.geometry.ffn_dim}{heads}; ideal speed-up (weight bytes, dense / dynamic) "
              f"{out.ideal_speedup:.2f}x")
    _write_json(args.json, {
        "method": method_label(method), "prompt": args.prompt, "sparse_decode": out.sparse_decode,
        "precision": args.precision,
        "dense": {"text": _text(handle, out.dense), "tokens_per_s": out.dense.decode_tokens_per_s},
        "dynamic": {"text": _text(handle, out.dynamic), "tokens_per_s": out.dynamic.decode_tokens_per_s},
        "speedup": out.speedup, "ideal_speedup": out.ideal_speedup, "same_tokens": out.same_tokens, "note": out.note})
    return 0


def _add_calibration_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-window", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows (of the shipped WikiText set)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", help="folder written by dynamic-calibrate, dynamic-train or the app")
    p.add_argument("--method", choices=METHOD_NAMES, help="calibrate now: a rule, or ipn (the untrained network)")
    p.add_argument("--target", type=float, default=0.5, help="FFN sparsity for --method (fraction of channels dropped)")
    _add_calibration_window_args(p)


def register(sub: Subparsers) -> None:
    """Add the dynamic-calibrate, dynamic-train, dynamic-eval and dynamic-generate verbs."""
    p = sub.add_parser("dynamic-calibrate", help="per-layer thresholds of a per-token rule, calibrated to a target")
    add_model_args(p)
    p.add_argument("--rule", required=True, choices=list(RULES))
    p.add_argument("--target", type=float, default=0.5, help="FFN sparsity: the fraction of channels dropped")
    _add_calibration_window_args(p)
    p.add_argument("--out", required=True, help="output folder (thresholds.safetensors + thresholds.json)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("dynamic-train", help="train the importance network (per-token channels, optionally heads)")
    add_model_args(p)
    p.add_argument("--target", type=float, default=0.5, help="FFN sparsity: the fraction of channels dropped")
    p.add_argument("--heads", action="store_true", help="also predict the query heads of each token")
    p.add_argument("--head-target", type=float, default=0.25, help="head sparsity, with --heads")
    p.add_argument("--no-adaptive", action="store_true", help="one threshold per layer, not one that follows the token")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=2, help="calibration windows per step")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--sparsity-weight", type=float, default=4.0, help="weight of the sparsity term")
    p.add_argument("--consistency", type=float, default=0.0, help="weight of the neighbouring-token term")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank on the FFN down projections jointly (0: none; the model "
                        "stays frozen, the adapters are applied per call; such a network has no sparse decode path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sketch", choices=SKETCHES, default=ROTATED,
                   help="the 4-bit weight sketch the network reads: of a randomly rotated input space (default; it "
                        "cannot reproduce weights that are themselves 4-bit) or of the weights as stored (aligned)")
    _add_calibration_window_args(p)
    p.add_argument("--out", required=True, help="output folder (ipn.safetensors + ipn.json)")
    p.add_argument("--json", help="also write the results (with the per-step history) to this JSON file")
    p.set_defaults(func=cmd_train, data_parallel=True)

    p = sub.add_parser("dynamic-eval", help="perplexity and sparsity under a per-token method; IPN vs the oracle")
    add_model_args(p)
    add_protocol_args(p)
    _add_method_args(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("dynamic-generate", help="dense vs dynamic greedy decoding side by side, with tokens/s")
    add_model_args(p)
    p.add_argument("prompt")
    _add_method_args(p)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="int4: dense and dynamic both read the FFN at 4 bits (importance networks only)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_generate)
