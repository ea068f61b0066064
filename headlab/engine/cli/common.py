"""What every verb of `python -m headlab` shares: flag groups, loading, progress bars, printing, user errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Iterator

import torch
from tqdm import tqdm

from headlab.engine.core.errors import USER_ERRORS
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.distributed.world import RankFailedError, World, launched, open_world
from headlab.engine.models.load import load_model
from headlab.engine.models.placement import describe_layout
from headlab.engine.pruning.strategies import CALIBRATION_CHOICES, Calibration
from headlab.engine.runtime.continuations import MIXED
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import PerplexityProtocol, PerplexityResult, perplexity

__all__ = [
    "USER_ERROR_STATUS",
    "Subparsers",
    "say",
    "is_main_process",
    "stage",
    "progress_bar",
    "count_or_fraction",
    "add_model_args",
    "add_protocol_args",
    "add_calibration_args",
    "calibration_from_args",
    "load_handle",
    "protocol_from_args",
    "load_mask",
    "print_cost",
    "measure_perplexity",
    "run_command",
]

USER_ERROR_STATUS = 2  # exit status of a command stopped by bad input (argparse uses 2 for bad flags too)

Subparsers = argparse._SubParsersAction  # what add_subparsers() returns; argparse gives it no public name


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process: the one that prints status and writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str) -> None:
    """A status line on stderr, so stdout stays the command's result (rank 0 only under torchrun)."""
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def stage(msg: str) -> None:
    """A `... step` line on stderr: the start of a slow stage."""
    say(f"... {msg}")


@contextlib.contextmanager
def progress_bar(desc: str) -> Iterator[Progress]:
    """A `progress(done, total)` callback drawing a tqdm bar on stderr; a new total starts the next phase."""
    bar = tqdm(desc=desc, unit="step", file=sys.stderr, leave=False, disable=not is_main_process())
    try:
        def update(done: int, total: int) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()

        yield update
    finally:
        bar.close()


def count_or_fraction(x: float) -> int | float:
    """A size flag as the engine takes it: a count from 1 up, a fraction below 1."""
    return int(x) if x >= 1 else float(x)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --trust-remote-code, --threads, --device-map, --max-memory, --offload-folder."""
    p.add_argument("--model", default=None, help="alias (smollm2-135m-instruct, gemma3-270m, minilm), local HF folder or hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device-map", default=None,
                   help="split a model that does not fit one device (accelerate): auto, balanced, balanced_low_0, "
                        "sequential, or a JSON {module: GPU index | cpu | disk} (inline or a file); replaces --device")
    p.add_argument("--max-memory", default=None, help="per-device limit for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    p.add_argument("--offload-folder", default=None, help="where disk-offloaded weights go (default: a temporary "
                                                          "folder in the cache, removed at exit)")


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """--window, --stride, --windows: the perplexity protocol."""
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--windows", type=int, default=12, help="number of evaluation windows")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """--calibration, --n-texts, --max-length, --batch-size: the texts a scoring pass runs on."""
    p.add_argument("--calibration", default="wikitext", choices=CALIBRATION_CHOICES,
                   help="the texts: WikiText-2 paragraphs, a shipped prompt set, or mixed (WikiText and the "
                        "model's own answers to training prompts, generated once and cached)")
    p.add_argument("--n-texts", type=int, default=32, help="number of calibration texts")
    p.add_argument("--max-length", type=int, default=256, help="tokens per calibration text")
    p.add_argument("--batch-size", type=int, default=4)


def calibration_from_args(args: argparse.Namespace, handle: ModelHandle) -> Calibration:
    """The --n-texts texts of --calibration at --max-length and --batch-size ("mixed" generates the model's own
    answers once, with a progress bar)."""
    generating = args.calibration == MIXED
    with progress_bar("answers for the mixed calibration") if generating else contextlib.nullcontext() as cb:
        calib = Calibration.shipped(args.calibration, args.n_texts, max_length=args.max_length, handle=handle,
                                    progress=cb)
    calib.batch_size = args.batch_size
    return calib


def load_handle(args: argparse.Namespace) -> ModelHandle:
    """The model named by the add_model_args flags, with one line about it on stderr."""
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    handle = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        device_map=args.device_map, max_memory=args.max_memory, offload_folder=args.offload_folder)
    g = handle.geometry
    say(f"model {handle.name}: {handle.adapter.family}, {g.n_layers} layers x {g.n_heads} heads "
        f"({g.n_kv_heads} KV heads), FFN {g.ffn_dim} ({time.perf_counter() - t:.1f} s to load)")
    if "device_layout" in handle.meta:
        say(f"device map: {describe_layout(handle.meta['device_layout'])}")
    return handle


def protocol_from_args(args: argparse.Namespace) -> PerplexityProtocol:
    """The perplexity protocol given by the add_protocol_args flags."""
    return PerplexityProtocol(window=args.window, stride=args.stride, n_windows=args.windows)


def load_mask(path: str | None, handle: ModelHandle) -> PruneMask | None:
    """The mask file at `path`, checked against the model; None without a path."""
    return None if path is None else PruneMask.load(path, handle.geometry)


def print_cost(handle: ModelHandle, mask: PruneMask) -> None:
    """One line: what the mask removes, in units, parameters and FLOPs per token."""
    c = cost(handle, mask)
    s = mask.summary()
    print(
        f"pruned: {s['heads_pruned']}/{s['heads_total']} heads, {s['ffn_channels_pruned']}/{s['ffn_channels_total']} "
        f"FFN channels, {s['attn_blocks_pruned']} ATTN + {s['ffn_blocks_pruned']} FFN sub-blocks; "
        f"parameters {c.params_kept:,}/{c.params_total:,} ({100 * c.params_removed_fraction:.1f}% removed), "
        f"FLOPs/token {100 * c.flops_removed_fraction:.1f}% removed"
    )


def measure_perplexity(handle: ModelHandle, mask: PruneMask | None, protocol: PerplexityProtocol,
                       label: str) -> PerplexityResult:
    """Perplexity under `mask` (None: dense) with a progress bar named by `label`."""
    with progress_bar(f"perplexity ({label})") as cb:
        return perplexity(handle, mask, protocol, progress=cb)


def _join_world(args: argparse.Namespace) -> contextlib.AbstractContextManager[World]:
    """The ranks torchrun started, for a verb that splits its work (set_defaults(data_parallel=True)); SINGLE otherwise."""
    if not launched():
        return open_world()
    if not getattr(args, "data_parallel", False):
        raise ValueError(f"`{args.command}` does not split its work across processes; run it as one process "
                         f"(without torchrun); docs/scale.md lists the verbs that do")
    if getattr(args, "device_map", None):
        raise ValueError("--device-map splits one model across devices, torchrun runs one model per process: "
                         "use one or the other (docs/scale.md)")
    device = getattr(args, "device", "cpu")
    if torch.device(device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per rank
    return open_world(device)


def run_command(args: argparse.Namespace) -> int:
    """Run the verb argparse chose; a user error prints one line on stderr and returns USER_ERROR_STATUS.

    Under torchrun the ranks join one World first (`args.world`); a rank that fails makes every
    rank stop with RankFailedError (printed once, by rank 0; exit status 1) before anything is written.
    """
    rank = f"[rank {os.environ.get('RANK')}] " if launched() else ""
    try:
        with _join_world(args) as world:
            args.world = world
            return args.func(args)
    except RankFailedError as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"{rank}error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS
