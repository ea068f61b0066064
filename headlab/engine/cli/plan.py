"""`python -m headlab plan`: what a long job needs before it runs: memory per device, the layout, an estimated time.

    python -m headlab plan --job score                                  # the default model, on this CPU
    python -m headlab plan --model path/to/llama-8b --job distill --dtype bfloat16 --device-map auto \\
        --max-memory 0=40GiB,1=40GiB,cpu=200GiB --processes 1
    python -m headlab plan --job train-masks --processes 4 --no-probe  # a torchrun job of 4 ranks, no probe
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from headlab.engine.cli.common import Subparsers, add_model_args, say
from headlab.engine.core.files import write_atomic_text
from headlab.engine.runtime.plan import JOB_DEFAULTS, JOBS, plan_job

__all__ = ["register", "cmd_plan"]


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan of --job (and write it as JSON with --json)."""
    shape = JOB_DEFAULTS[args.job]
    given = {k: getattr(args, k) for k in ("n_texts", "max_length", "batch_size", "steps", "masks")
             if getattr(args, k) is not None}
    shape = replace(shape, **given)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_probe:
        say(f"... loading the model for a short timed probe ({shape.batch_size} x {min(shape.max_length, 512)} "
            f"tokens, 1 + 3 forwards)")
    plan = plan_job(args.job, model=args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                    max_memory=args.max_memory, processes=args.processes, shape=shape, probe=not args.no_probe)
    print("\n".join(plan.lines()))
    if args.json:
        write_atomic_text(args.json, json.dumps(plan.to_dict(), indent=1, default=str))
        say(f"wrote {args.json}")
    return 0


def register(sub: Subparsers) -> None:
    """Add the plan verb."""
    p = sub.add_parser("plan", help="memory per device, device layout and estimated time of a long job")
    p.add_argument("--job", required=True, choices=JOBS)
    add_model_args(p)
    p.add_argument("--processes", type=int, default=1, help="torchrun processes the job would run on")
    p.add_argument("--n-texts", type=int, default=None, help="calibration / training texts (the job's default)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps (train-masks: per mask)")
    p.add_argument("--masks", type=int, default=None, help="train-masks: clusters + 1 (the static mask)")
    p.add_argument("--no-probe", action="store_true", help="skip the timed probe (no time estimate, loads nothing)")
    p.add_argument("--json", help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)
