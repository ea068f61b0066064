"""The processes of one data-parallel job (torch.distributed), as one value passed to the long engine calls.

    torchrun --nproc-per-node 2 -m headlab score --criteria ablation --out scores.csv

torchrun starts N copies of the command and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT in each; `open_world` joins them into one process group (gloo on the CPU, NCCL when the
model runs on CUDA) and yields a `World`. An engine call that can split its work takes `world=`:
capture and ablation scoring, per-cluster mask training, importance-network training and distillation.
`SINGLE` (the default everywhere) is one process: no group, every collective is the identity, so the
same code runs unchanged without torchrun.

How work is split (docs/scale.md): items are dealt round-robin (`shard`, `owns`: item i goes to rank
i % size), each rank computes its share, and the shares are combined (`all_sum` of partial sums, or
`all_gather` of per-item results), so every rank ends with the whole result, equal to one process's.

Failure: a rank whose share raises still joins the next `settle`, with its error instead of a result;
`settle` then raises `RankFailedError` on every rank, naming the rank(s) and their errors, so no rank
goes on to write an output and no rank waits forever. Collectives also time out
(HEADLAB_DIST_TIMEOUT seconds, default 1800), and torchrun ends the other ranks when one exits with
an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["World", "SINGLE", "RankFailedError", "launched", "open_world", "TIMEOUT_ENV"]

T = TypeVar("T")
TIMEOUT_ENV = "HEADLAB_DIST_TIMEOUT"


class RankFailedError(RuntimeError):
    """A rank of a data-parallel job failed; raised on every rank, so all stop before writing anything."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`; `backend` None means one process (no group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and prints results."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Item `index` of a split list is this rank's (round-robin)."""
        return index % self.size == self.rank

    def shard(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's (index, item) pairs of `items`, dealt round-robin."""
        return [(i, x) for i, x in enumerate(items) if self.owns(i)]

    def settle(self, error: BaseException | None, what: str) -> None:
        """Every rank reports whether its share of `what` succeeded; any failure raises RankFailedError everywhere."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        mine = None if error is None else f"{type(error).__name__}: {error}"
        reports: list[Any] = [None] * self.size
        dist.all_gather_object(reports, mine)
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if failed:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
            raise RankFailedError(f"{what} failed on {len(failed)} of {self.size} ranks ({detail}); "
                                  f"nothing was written") from error

    def run(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` on this rank, then `settle`: its result once every rank's share succeeded.

        `fn` must not call collectives itself (a rank that failed before one would leave the others in it).
        """
        error: BaseException | None = None
        result: Any = None
        try:
            result = fn()
        except Exception as e:  # reported to every rank by settle; KeyboardInterrupt etc. end the process
            error = e
        self.settle(error, what)
        return result

    def all_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element-wise sums over the ranks of each tensor (each rank's tensors alike in shape), as new tensors."""
        if not self.distributed:
            return dict(tensors)
        out = {}
        comm = self._comm_device()
        for name, t in tensors.items():
            buf = t.detach().to(comm, copy=True)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            out[name] = buf.to(t.device)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable; keep it small and on the CPU), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace each parameter's .grad by its mean over the ranks (DistributedDataParallel's reduction)."""
        if not self.distributed:
            return
        comm = self._comm_device()
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            buf = g.detach().to(comm, copy=True)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            p.grad = (buf / self.size).to(p.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


SINGLE = World()


def launched() -> bool:
    """This process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def open_world(device: str | torch.device = "cpu") -> Iterator[World]:
    """Join the ranks torchrun started (gloo for a CPU `device`, NCCL for CUDA) for the body; SINGLE when not launched.

    With NCCL each rank takes GPU LOCAL_RANK (`World.local_rank`); the group is destroyed at the end,
    also when the body raises.
    """
    if not launched():
        yield SINGLE
        return
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already open in this process")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda under torchrun, but this machine has no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} needs GPU {local_rank}, but this node has {torch.cuda.device_count()}: "
                             f"start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=_timeout())
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, backend=backend)
    finally:
        dist.destroy_process_group()
