"""What a run keeps on disk so that `resume=True` continues it exactly: k steps + resume to N equals N steps straight.

    out_dir/checkpoint/weights.safetensors    the trainable weights, by parameter name
    out_dir/checkpoint/optimizer.safetensors  the AdamW moments, keyed "<parameter>::<slot>"
    out_dir/checkpoint/state.json             the run state (step, history, best, ...) and a fingerprint
    out_dir/best.safetensors                  the trainable weights at the best held-out evaluation

The fingerprint (settings, data, trainable shapes) refuses a resume that would not be the same run.
The step records live here, not with the loop, because the run state that holds them is what
a checkpoint stores and restores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.recovery.distill.config import DistillConfig, DistillError
from headlab.engine.recovery.distill.data import DistillData

__all__ = ["CHECKPOINT", "BEST", "StepRecord", "has_checkpoint"]

CHECKPOINT = "checkpoint"
BEST = "best.safetensors"


@dataclass(frozen=True)
class StepRecord:
    """One optimisation step; `heldout` is set on evaluation steps. Step 0 is the student before
    training: held-out gap only, no loss."""

    step: int
    steps: int
    loss: float | None
    kd: float | None
    hidden: float | None
    lr: float
    heldout: float | None
    elapsed_s: float
    stage: str = ""


@dataclass
class _RunState:
    step: int = 0
    history: list[StepRecord] = field(default_factory=list)
    initial: float = math.inf
    best: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0
    planned: int | None = None  # the run's length when a re-size changed it (loop.distill's `resize`)


def has_checkpoint(out_dir: str | os.PathLike | None) -> bool:
    """A resumable checkpoint exists in `out_dir`."""
    return out_dir is not None and (Path(out_dir) / CHECKPOINT / "state.json").is_file()


def _fingerprint(student: ModelHandle, config: DistillConfig, data: DistillData,
                 params: dict[str, nn.Parameter]) -> dict:
    shapes = hashlib.sha256(json.dumps([(n, list(p.shape)) for n, p in params.items()]).encode()).hexdigest()[:16]
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_every",)}
    return {"config": cfg, "data": data.fingerprint(), "trainable": shapes, "student": student.name}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _save_best(out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, out_dir / BEST)


def _load_best(out_dir: Path) -> dict[str, torch.Tensor] | None:
    path = out_dir / BEST
    return load_file(str(path)) if path.exists() else None


def _optimizer_tensors(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        for key, v in opt.state.get(p, {}).items():
            out[f"{name}::{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _write_checkpoint(out_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                      state: _RunState, fingerprint: dict) -> None:
    """Write out_dir/checkpoint atomically: a complete temporary folder renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(dict(params), tmp / "weights.safetensors")
    _save_tensors(_optimizer_tensors(opt, params), tmp / "optimizer.safetensors")
    meta = {"format": "headlab.distill_checkpoint", "version": 1, "fingerprint": fingerprint,
            "state": {**{k: v for k, v in state.__dict__.items() if k != "history"},
                      "history": [asdict(r) for r in state.history]}}
    (tmp / "state.json").write_text(json.dumps(meta))
    final, old = out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                     fingerprint: dict) -> _RunState:
    folder = out_dir / CHECKPOINT
    meta = json.loads((folder / "state.json").read_text())
    saved = meta.get("fingerprint", {})
    for key in ("config", "data", "trainable"):
        if saved.get(key) != fingerprint[key]:
            what = {"config": "settings", "data": "training texts", "trainable": "student (mask or mode)"}[key]
            raise DistillError(f"the checkpoint in {folder} was made with other {what}; resume with the same ones "
                               "or choose another output folder")
    weights = load_file(str(folder / "weights.safetensors"))
    moments = load_file(str(folder / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in moments.items():
        name, slot = key.split("::")
        by_param.setdefault(name, {})[slot] = v
    order = list(params)
    opt_state = opt.state_dict()
    opt_state["state"] = {order.index(n): s for n, s in by_param.items()}
    opt.load_state_dict(opt_state)
    raw = meta["state"]
    state = _RunState(**{k: v for k, v in raw.items() if k != "history"})
    state.history = [StepRecord(**r) for r in raw["history"]]
    return state
