"""Jobs the data-parallel tests start as one process or under torchrun (tests/test_scale_torchrun.py).

    python -m tests.scale_jobs router OUT.json                 # per-cluster masks on a tiny llama
    torchrun --standalone --nproc-per-node 2 -m tests.scale_jobs router OUT.json
    torchrun ... -m tests.scale_jobs failing-rank 1 ablation score ...  # `python -m headlab score ...`, rank 1 raising
    torchrun ... -m tests.scale_jobs ipn OUT.json              # importance-network training on a tiny llama
    torchrun ... -m tests.scale_jobs distill OUT.json          # distillation of a pruned tiny llama

Run from the repository root (`-m` finds `tests` and `engine` there).
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch

from headlab.engine.cli.main import main
from headlab.engine.core.files import write_atomic_text
from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.distributed.world import open_world
from headlab.engine.dynamic.ipn import IPNConfig, train_ipn
from headlab.engine.dynamic.ipn import train as ipn_train
from headlab.engine.export.surgery import prune
from headlab.engine.importance import ablation
from headlab.engine.pruning.softmask import MaskTarget, TrainConfig
from headlab.engine.recovery.distill import DistillConfig, DistillData, distill
from headlab.engine.routing.clusters import calibration_prompts, kmeans
from headlab.engine.routing.router import train_router
from tests.tiny import tiny_handle


def router_job(out: str) -> int:
    """Three cluster masks and the static one on a tiny llama; rank 0 writes the masks as JSON."""
    handle = tiny_handle("llama")
    prompts = calibration_prompts(per_source=6)
    embeddings = torch.randn(len(prompts), 8, generator=torch.Generator().manual_seed(0))
    clustering = kmeans(embeddings, k=3, seed=0)
    encoder = types.SimpleNamespace(name="random-embeddings")  # train_router reads only its name
    with open_world() as world:
        router = train_router(handle, encoder, prompts, embeddings, clustering, MaskTarget(blocks=1, heads=2),
                              TrainConfig(steps=4, batch_size=2, max_length=24), world=world)
        if world.is_main:
            write_atomic_text(out, json.dumps({"world": world.size,
                                               "masks": [m.to_dict() for m in router.masks],
                                               "static": router.static_mask.to_dict(),
                                               "trained": sorted(router.meta["train_seconds"])}))
    return 0


def ipn_job(out: str) -> int:
    """A few steps of importance-network training, data-parallel; rank 0 writes the history and parameters."""
    handle = tiny_handle("llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with open_world() as world:
        run = train_ipn(handle, IPNConfig(steps=3, batch=2, window=16, n_windows=4), ids, world=world)
        if world.is_main:
            params = {n: p.detach().flatten().tolist() for n, p in run.ipn.named_parameters()}
            write_atomic_text(out, json.dumps({"world": world.size, "history": run.history, "params": params}))
    return 0


def distill_job(out: str) -> int:
    """Three steps distilling a pruned tiny llama (texts of equal token counts); rank 0 writes history and weights."""
    teacher = tiny_handle("llama")
    mask = PruneMask.dense(teacher.geometry)
    mask.ffn[:, : teacher.geometry.ffn_dim // 2] = 0
    student = prune(teacher, mask)
    texts = [t[:160] for t in calibration_texts("wikitext", 10)]  # 160 bytes: every text fills max_length
    data = DistillData(tuple(texts[:8]), tuple(texts[8:]))
    config = DistillConfig(steps=3, batch_size=2, max_length=48, lr=3e-4, warmup=1, eval_every=3)
    with open_world() as world:
        result = distill(teacher, student, data, config, world=world)
        if world.is_main:
            weights = {n: p.detach().flatten().tolist() for n, p in student.model.named_parameters()}
            write_atomic_text(out, json.dumps({"world": world.size, "loss": [r.loss for r in result.history],
                                               "heldout": result.initial_heldout, "weights": weights}))
    return 0


FAULTS = {"ablation": (ablation, "head_removal_mask"), "ipn-step": (ipn_train, "_kl")}


def failing_rank(rank: str, fault: str, argv: list[str]) -> int:
    """`python -m headlab ARGV`, except that rank `rank` raises where FAULTS[fault] names (first ablated head,
    or the loss of the first importance-network step)."""
    if os.environ.get("RANK") == rank:
        def fail(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank {rank}")

        module, name = FAULTS[fault]
        setattr(module, name, fail)
    return main(argv)


if __name__ == "__main__":
    job, rest = sys.argv[1], sys.argv[2:]
    if job == "router":
        sys.exit(router_job(rest[0]))
    if job == "ipn":
        sys.exit(ipn_job(rest[0]))
    if job == "distill":
        sys.exit(distill_job(rest[0]))
    if job == "failing-rank":
        sys.exit(failing_rank(rest[0], rest[1], rest[2:]))
    sys.exit(f"unknown job {job!r}")
