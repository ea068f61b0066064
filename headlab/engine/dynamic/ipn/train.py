"""Training an importance network end to end against the dense model.

    run = train_ipn(handle, IPNConfig(target=0.5, steps=120))
    run.ipn, run.history

The model stays frozen (its parameters are never handed to the optimiser, and gradients are taken
with torch.autograd.grad, so nothing is written to the shared model); only the network's few
parameters per layer move. The loss on a batch of calibration windows is

    KL(dense || masked)                            the masked model's next-token distribution vs the dense one's
  + sparsity * |mean kept fraction - (1 - target)|  L1 on the mask activations, driven to the target
  + head_sparsity * |mean kept heads - (1 - head_target)|   (with head prediction)
  + consistency * mean |m_t - m_{t-1}|              neighbouring tokens get similar masks

with straight-through masks (headlab.engine.dynamic.ipn.apply). With `lora_rank`, LoRA adapters on the FFN
down projections (held by the network, applied per call) are trained jointly: the model adapts to
the channels it drops without its weights changing.

The network starts from the untrained one
(the oracle's score on the weight sketch, thresholds calibrated per layer) so the first step is
already a good sparse model; training then learns how each layer weighs gate, up and the down
column's norm, a bias per channel, input-adaptive thresholds, and how much each layer keeps. At the
end one common threshold shift brings the average sparsity on the calibration windows to the target
exactly (headlab.engine.dynamic.ipn.calibrate.match_sparsity).

The dense model's log-probabilities of the calibration windows are computed once (float16) and reused.

Data-parallel (`world=`, under torchrun): each step's batch of windows is split evenly across the ranks,
each rank takes the gradient of the loss on its share and the gradients are averaged (what
DistributedDataParallel does), so every rank holds the same network after every step. The KL term
is the one of the whole batch (windows have equal lengths); the sparsity and consistency terms are
taken per share and averaged, so the run is close to, not bit-equal with, one process's. Replicated
on every rank: the dense pass over the windows, the threshold calibration and the final sparsity match.
The history holds the mean over the ranks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.distributed.world import SINGLE, World
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.ipn.apply import IPNTrace, apply_ipn
from headlab.engine.dynamic.ipn.calibrate import calibrate_thresholds, match_sparsity
from headlab.engine.dynamic.ipn.network import IPN, IPNError
from headlab.engine.dynamic.rotation import ROTATED, SKETCHES

__all__ = ["IPNConfig", "IPNTraining", "train_ipn", "training_key"]


@dataclass(frozen=True)
class IPNConfig:
    """How to train an importance network (every field checked on construction)."""

    target: float = 0.5  # FFN sparsity: the average fraction of channels a token drops
    heads: bool = False  # also predict query heads per token
    head_target: float = 0.25  # head sparsity, with `heads`
    adaptive: bool = True  # thresholds that follow the token (tau + v . x / rms(x))
    steps: int = 120
    batch: int = 2  # windows per step
    window: int = 256  # tokens per window
    n_windows: int = 8  # calibration windows (the dense model's outputs on them are kept in memory)
    lr: float = 0.01
    sparsity: float = 4.0  # weight of the sparsity term
    consistency: float = 0.0  # weight of the neighbouring-token mask consistency term
    temperature: float = 0.5  # of the straight-through sigmoid, in log units of the score
    lora_rank: int = 0  # > 0: train LoRA adapters on the FFN down projections jointly (the model stays frozen)
    lora_lr: float = 1e-3
    seed: int = 0
    sketch: str = ROTATED  # the weight sketch the network reads: of the rotated input space, or "aligned"

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise IPNError(f"target FFN sparsity must be in [0, 1), got {self.target}")
        if not 0.0 <= self.head_target < 1.0:
            raise IPNError(f"target head sparsity must be in [0, 1), got {self.head_target}")
        for name in ("steps", "batch", "window", "n_windows"):
            if getattr(self, name) < 1:
                raise IPNError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch > self.n_windows:
            raise IPNError(f"a batch of {self.batch} windows needs at least that many windows, got {self.n_windows}")
        if self.lora_rank < 0:
            raise IPNError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.sketch not in SKETCHES:
            raise IPNError(f"unknown sketch {self.sketch!r}; choose one of {', '.join(SKETCHES)}")
        for name in ("lr", "temperature", "lora_lr"):
            if not getattr(self, name) > 0:
                raise IPNError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("sparsity", "consistency"):
            if getattr(self, name) < 0:
                raise IPNError(f"{name} weight must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def training_key(handle: ModelHandle, config: IPNConfig, ids: torch.Tensor | None = None) -> str:
    """A digest of everything that decides a trained network: the model's name, every IPNConfig field, the windows.

    Two trainings share a key only when they would train the same network (same steps, rates, targets, seed,
    sketch, ... on the same token windows), so a cache folder named by it is never reused by a run of other
    settings: a 50-step network is not a 100-step one. `ids` None: the default windows train_ipn would make.
    """
    ids = calibration_ids(handle, window=config.window, n_windows=config.n_windows) if ids is None else ids
    ids = ids.detach().cpu().contiguous()
    h = hashlib.sha256()
    h.update(json.dumps({"model": handle.name, "config": config.to_dict()}, sort_keys=True).encode())
    h.update(f"{ids.dtype}{tuple(ids.shape)}".encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class IPNTraining:
    """A trained network, its per-step history and the wall time it took."""

    ipn: IPN
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    measured_sparsity: float = float("nan")
    stopped: bool = False


def _kl(teacher_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) from teacher log-probs and student logits."""
    logq = F.log_softmax(logits.float(), dim=-1)
    p = F.log_softmax(teacher_logp.float(), dim=-1)  # renormalised after the float16 round trip
    return (p.exp() * (p - logq)).sum(-1).mean()


def _consistency(masks: list[torch.Tensor]) -> torch.Tensor:
    if not masks or masks[0].shape[-2] < 2:
        return torch.zeros(())
    return torch.stack([(m[..., 1:, :] - m[..., :-1, :]).abs().mean() for m in masks]).mean()


@torch.no_grad()
def _teacher(handle: ModelHandle, ids: torch.Tensor, progress: Progress | None) -> torch.Tensor:
    out = []
    for i in range(ids.shape[0]):
        logits = handle.model(input_ids=ids[i : i + 1].to(handle.device)).logits
        out.append(F.log_softmax(logits.float(), dim=-1).half().cpu())
        if progress:
            progress(i + 1, ids.shape[0])
    return torch.cat(out)


def train_ipn(handle: ModelHandle, config: IPNConfig = IPNConfig(), ids: torch.Tensor | None = None, *,
              progress: Progress | None = None, on_step: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None, world: World = SINGLE) -> IPNTraining:
    """Train an importance network for `handle` (model frozen); see the module docstring.

    ids: [B, T] calibration windows (default: config.n_windows windows of config.window tokens of the shipped
    calibration text). progress(done, total) covers the dense pass and the steps; on_step(entry) gets each
    step's history entry (loss, kl, ffn_sparsity, head_sparsity, consistency, seconds, and layer_sparsity: the
    fraction of channels each layer dropped in that step, the network's gate activity); should_stop() ends training early (the network so far is returned, stopped=True).
    world: the ranks of a data-parallel job (module docstring); should_stop must then answer alike on every rank.
    """
    if not handle.is_causal_lm:
        raise IPNError(f"{handle.name} has no LM head: the importance network is trained against next-token outputs")
    if config.batch % world.size:
        raise IPNError(f"a batch of {config.batch} windows does not split evenly across {world.size} processes: "
                       f"make it a multiple of {world.size}")
    torch.manual_seed(config.seed)
    ids = calibration_ids(handle, window=config.window, n_windows=config.n_windows) if ids is None else ids
    t0 = time.perf_counter()
    total = ids.shape[0] + config.steps
    teacher = _teacher(handle, ids, (lambda d, n: progress(d, total)) if progress else None)

    ipn = IPN.for_model(handle, heads=config.heads, adaptive=config.adaptive, target=config.target,
                        head_target=config.head_target, temperature=config.temperature,
                        lora_rank=config.lora_rank, sketch=config.sketch).to(handle.device)
    calibrate_thresholds(handle, ipn, ids[: max(config.batch, 2)])
    params = [p for p in ipn.parameters() if p.requires_grad]
    lora = [p for name, p in ipn.named_parameters() if name.startswith("lora_")]
    opt = torch.optim.Adam([{"params": [p for p in params if all(p is not q for q in lora)], "lr": config.lr},
                            {"params": lora, "lr": config.lora_lr}])
    keep_target, head_keep_target = 1.0 - config.target, 1.0 - config.head_target
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(ids.shape[0], generator=generator)
    run = IPNTraining(ipn)
    pos = 0
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            run.stopped = True
            break
        if pos + config.batch > len(order):
            order, pos = torch.randperm(ids.shape[0], generator=generator), 0
        rows = order[pos : pos + config.batch][world.rank :: world.size]  # this rank's share of the batch
        pos += config.batch
        batch = ids[rows].to(handle.device)
        trace = IPNTrace()
        with torch.enable_grad(), apply_ipn(handle, ipn, trace=trace):
            logits = handle.model(input_ids=batch).logits
            kl = _kl(teacher[rows].to(handle.device), logits)
            kept = torch.stack([m.mean() for m in trace.ffn]).mean()
            loss = kl + config.sparsity * (kept - keep_target).abs()
            head_kept = torch.stack([m.mean() for m in trace.heads]).mean() if trace.heads else None
            if head_kept is not None:
                loss = loss + config.sparsity * (head_kept - head_keep_target).abs()
            cons = _consistency(trace.ffn + trace.heads) if config.consistency > 0 else torch.zeros(())
            loss = loss + config.consistency * cons
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, gr in zip(params, grads):
            p.grad = gr
        world.average_gradients([p for p in params if p.grad is not None])  # unused ones are so on every rank
        opt.step()
        opt.zero_grad(set_to_none=True)
        scalars = [loss, kl, kept, head_kept if head_kept is not None else torch.zeros(()), cons,
                   *[m.mean() for m in trace.ffn]]
        logged = torch.stack([v.detach().float().cpu() for v in scalars])  # one all-reduce for the whole entry
        loss_v, kl_v, kept_v, head_v, cons_v, *layers_v = (world.all_sum({"v": logged})["v"] / world.size).tolist()
        entry = {"step": step + 1, "loss": loss_v, "kl": kl_v,
                 "ffn_sparsity": 1.0 - kept_v,
                 "head_sparsity": None if head_kept is None else 1.0 - head_v,
                 "consistency": cons_v, "seconds": time.perf_counter() - t0,
                 "layer_sparsity": [1.0 - v for v in layers_v]}
        run.history.append(entry)
        if on_step:
            on_step(entry)
        if progress:
            progress(ids.shape[0] + step + 1, total)
    run.measured_sparsity = match_sparsity(handle, ipn, ids[: min(ids.shape[0], 4)])
    run.seconds = time.perf_counter() - t0
    return run
