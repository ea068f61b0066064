"""A plan before a long job: parameters, memory per device, the device layout and a time estimate.

    plan = plan_job("score", model="path/to/llama-8b", dtype="bfloat16", device_map="auto", processes=4)
    print("\\n".join(plan.lines()))

Nothing here trains or scores. The parameters and the layout come from the model's config on
the meta device (no weight is read; accelerate solves "auto" maps over `max_memory`). The time
comes from a short timed probe: a few forward passes of one batch of the job's shape on the model
as the job would hold it (an open handle, or the model loaded with the same layout), turned into
seconds per token and multiplied by the job's work counted in forward passes (a backward counts
as two). Memory per device is the layout's weights plus an activation estimate. Both are
estimates, stated with what they assume (`JobPlan.notes`); the work counts follow the engine's
own loops (capture, ablation replay, mask training, distillation) and what torchrun splits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import AutoConfig

from headlab.engine.core.adapter import Geometry
from headlab.engine.core.handle import ModelHandle
from headlab.engine.models import placement
from headlab.engine.models.adapters import adapter_class, adapter_for
from headlab.engine.models.load import DEFAULT_MODEL, load_model, resolve_dtype, resolve_source

__all__ = ["JOBS", "JobShape", "JOB_DEFAULTS", "DevicePlan", "JobPlan", "plan_job", "probe_seconds"]

JOBS = ("score", "suggest", "train-masks", "distill")


@dataclass(frozen=True)
class JobShape:
    """How big the job is: the flags of its verb that set its work."""

    n_texts: int = 32  # calibration texts (score, suggest) / training texts per mask (train-masks)
    max_length: int = 256  # tokens per text
    batch_size: int = 4
    steps: int = 0  # training steps (train-masks: per mask; distill: in all)
    masks: int = 0  # train-masks: clusters + the static mask
    ablation_texts: int = 4  # the ablation criterion's replay (headlab.engine.importance.ablation defaults)
    ablation_length: int = 128
    eval_tokens: int = 12 * 512  # a perplexity measurement (the pinned protocol)


JOB_DEFAULTS = {
    "score": JobShape(),
    "suggest": JobShape(),
    "train-masks": JobShape(n_texts=40, max_length=128, steps=60, masks=5),
    "distill": JobShape(n_texts=112, max_length=128, steps=150),
}

_WHAT_SPLITS = {
    "score": "capture batches and ablated heads",
    "suggest": "capture batches and ablated heads (run `score --criteria ablation` under torchrun)",
    "train-masks": "one mask per rank",
    "distill": "each step's batch (gradients averaged)",
}


@dataclass(frozen=True)
class DevicePlan:
    device: str
    weight_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclass
class JobPlan:
    """What `plan_job` found: sizes, layout, memory per device, the probe and the estimated time."""

    job: str
    model: str
    family: str
    dtype: str
    parameters: int
    geometry: dict[str, Any]
    layout: dict[str, list[str]]
    devices: list[DevicePlan]
    processes: int
    work: str
    forward_equivalents: float  # per process: token-forwards / probe tokens
    shape: JobShape
    probe_tokens: int = 0
    probe_seconds: float | None = None  # per forward of the probe batch
    estimated_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = [{**asdict(p), "total_bytes": p.total_bytes} for p in self.devices]
        return d

    def headline(self) -> str:
        """One phrase: the estimated time and the busiest device's memory."""
        busiest = max(self.devices, key=lambda p: p.total_bytes if p.device != "disk" else -1)
        when = f"about {_duration(self.estimated_seconds)}" if self.estimated_seconds is not None else "untimed"
        return f"{when}, {_gb(busiest.total_bytes)} on {busiest.device}"

    def lines(self) -> list[str]:
        """The plan as the CLI prints it and the app shows it."""
        out = [(f"plan: {self.job} on {self.model} ({self.family}), {self.parameters / 1e6:,.1f}M parameters, "
                f"{self.dtype}"),
               f"layout: {placement.describe_layout(self.layout)}",
               "memory per device (estimate): " + "; ".join(
                   f"{p.device} {_gb(p.total_bytes)} ({_gb(p.weight_bytes)} weights + {_gb(p.activation_bytes)} "
                   f"activations)" for p in self.devices),
               f"work: {self.work}",
               f"processes: {self.processes}" + (f" (torchrun splits {_WHAT_SPLITS[self.job]})"
                                                 if self.processes > 1 else "")]
        if self.probe_seconds is None:
            out.append("time: no probe run (--no-probe)")
        else:
            out.append(f"probe: {self.probe_seconds:.3f} s per forward of {self.probe_tokens} tokens "
                       f"({1e3 * self.probe_seconds / self.probe_tokens:.3f} ms per token)")
            out.append(f"estimated time: {_duration(self.estimated_seconds)} "
                       f"({self.forward_equivalents:,.0f} probe-sized forwards per process)")
        out += [f"note: {n}" for n in self.notes]
        return out


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _activations(g: Geometry, b: int, batch: int, tokens: int, backward: bool) -> int:
    """Bytes of activations of one forward (with `backward`: kept for it) of [batch, tokens]."""
    per_layer = batch * tokens * (6 * g.hidden + 3 * g.ffn_dim) * b + 2 * batch * g.n_heads * tokens**2 * b
    logits = batch * tokens * g.vocab_size * (b + 4)  # the logits, and their float32 log-softmax
    return (g.n_layers if backward else 1) * per_layer + logits * (2 if backward else 1)


def _layer_share(g: Geometry) -> float:
    """The share of a forward's multiply-adds in the layers (the rest: the LM head over the vocabulary)."""
    attention = g.hidden * (2 * g.n_heads + 2 * g.n_kv_heads) * g.head_dim
    layer = attention + 3 * g.hidden * g.ffn_dim
    return g.n_layers * layer / (g.n_layers * layer + g.vocab_size * g.hidden)


def _work(job: str, g: Geometry, shape: JobShape, world: int, b: int) -> tuple[float, int, str, list[str]]:
    """(token-forwards per process, activation bytes at the peak, description, notes) of `job`."""
    s, L, H = shape, g.n_layers, g.n_heads
    tokens = s.batch_size * s.max_length
    batches = math.ceil(s.n_texts / s.batch_size)
    notes: list[str] = []
    if job in ("score", "suggest"):
        capture = math.ceil(batches / world) * 3 * tokens  # forward + backward (gate gradients)
        a_tokens = s.ablation_texts * s.ablation_length
        heads = math.ceil(L * H / world)
        # A head of layer l replays layers l..L-1 (on average (L + 1) / 2 of them), then the LM head and the KL.
        layers = _layer_share(g)
        per_head = layers * (L + 1) / (2 * L) + (1 - layers)
        ablation = a_tokens * (2 + heads * per_head)  # the dense pass and the record, then one replay per head
        record = (L + 1) * a_tokens * g.hidden * b + a_tokens * g.vocab_size * 4
        peak = max(_activations(g, b, s.batch_size, s.max_length, True),
                   record + _activations(g, b, s.ablation_texts, s.ablation_length, False))
        work = (f"capture: {batches} batches of {s.batch_size} x {s.max_length} tokens, forward + backward; "
                f"ablation: {L * H} heads, each replaying on average {(L + 1) / 2:.1f} of {L} layers over "
                f"{s.ablation_texts} x {s.ablation_length} tokens")
        total = capture + ablation
        if job == "suggest":
            total += 2 * s.eval_tokens  # dense and pruned perplexity, on one rank
            work += f"; perplexity of the result (2 x {s.eval_tokens} tokens)"
            notes.append("suggest in its fast mode; 'measured' re-scores near the cut 4 times, 'optimise' trains "
                         "a mask (see train-masks)")
        return total, peak, work, notes
    if job == "train-masks":
        per_mask = s.steps * 3 * tokens + min(s.steps, batches) * tokens  # masked fwd + bwd, dense once per batch
        masks = math.ceil(s.masks / world)
        cache = min(256 * 2**20, batches * tokens * g.vocab_size * 4)
        work = (f"{s.masks} masks x {s.steps} steps of {s.batch_size} x {s.max_length} tokens, forward + backward "
                f"({masks} mask(s) per process)")
        return masks * per_mask, _activations(g, b, s.batch_size, s.max_length, True) + cache, work, notes
    if job == "distill":
        share = max(s.batch_size // world, 1)
        per_step = (1 + 3) * share * s.max_length  # teacher forward, student forward + backward
        evals = math.ceil(s.steps / 25) * 2 * 200 * s.max_length  # held-out every 25 steps: teacher + student
        work = (f"{s.steps} steps of {s.batch_size} x {s.max_length} tokens (teacher forward, student forward + "
                f"backward), held-out evaluation every 25 steps")
        notes.append("the student is counted at the teacher's size (an upper bound) with AdamW state for every "
                     "weight (full fine-tuning; LoRA needs far less)")
        return s.steps * per_step + evals, _activations(g, b, share, s.max_length, True), work, notes
    raise ValueError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")


def probe_seconds(handle: ModelHandle, batch: int, tokens: int, repeats: int = 3) -> float:
    """Seconds per forward of a [batch, tokens] batch of random ids (one warm-up first, then the mean of `repeats`)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, handle.geometry.vocab_size, (batch, tokens), generator=gen).to(handle.device)
    with torch.no_grad():
        handle.model(input_ids=ids)
        if handle.device.type == "cuda":
            torch.cuda.synchronize(handle.device)
        t = time.perf_counter()
        for _ in range(repeats):
            handle.model(input_ids=ids)
        if handle.device.type == "cuda":
            torch.cuda.synchronize(handle.device)
    return (time.perf_counter() - t) / repeats


def plan_job(
    job: str,
    *,
    model: str | None = None,
    handle: ModelHandle | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: placement.DeviceMap | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    processes: int = 1,
    shape: JobShape | None = None,
    probe: bool = True,
    probe_repeats: int = 3,
) -> JobPlan:
    """The plan of `job` on `handle` (an open model) or `model` (a name; loaded only for the probe).

    The probe times `probe_repeats` forwards of one batch of the job's shape after one warm-up.
    """
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes > 1 and device_map is not None:
        raise ValueError("a device map splits one model across devices, torchrun runs one model per process: "
                         "plan one or the other (docs/scale.md)")
    shape = shape or JOB_DEFAULTS[job]
    if handle is not None:
        meta_source = handle.model
        torch_dtype = handle.dtype
        layout = placement.device_layout(handle.model)
        geometry = handle.geometry
        name, family = handle.name, handle.adapter.family
        sizes = {d: sum(p.numel() * p.element_size() for n, p in handle.model.named_parameters()
                        if any(m == "" or n == m or n.startswith(m + ".") for m in names))
                 for d, names in layout.items()}
    else:
        source = resolve_source(model or DEFAULT_MODEL)
        config = AutoConfig.from_pretrained(source)
        adapter_class(config.model_type, str(model))
        torch_dtype = resolve_dtype(dtype)
        meta_source = placement.meta_model(config)
        geometry = adapter_for(meta_source).geometry
        name, family = model or DEFAULT_MODEL, adapter_for(meta_source).family
        dmap, module_sizes = placement.planned_device_map(meta_source, torch_dtype, device_map, max_memory)
        if device_map is None:
            dmap = {"": str(device)}
        layout = {}
        for module, d in dmap.items():
            layout.setdefault(f"cuda:{d}" if isinstance(d, int) else str(d), []).append(module)
        sizes = placement.bytes_per_device(dmap, module_sizes)
    b = torch.tensor([], dtype=torch_dtype).element_size()
    n_params = sum(p.numel() for p in meta_source.parameters())
    token_forwards, activations, work, notes = _work(job, geometry, shape, processes, b)
    if job == "distill":
        student = n_params * (2 * b + 2 * 4)  # weights + gradients in the dtype, AdamW's two float32 moments
        sizes = {d: n + student * n // max(sum(sizes.values()), 1) for d, n in sizes.items()}
    # Activations live where the layers compute, in proportion to the weights there; disk holds none.
    computing = {d: n for d, n in sizes.items() if d != "disk"} or {"cpu": 0}
    total = sum(computing.values())
    devices = [DevicePlan(d, int(n), int(activations * n / total) if total else activations)
               for d, n in computing.items()]
    if "disk" in sizes:
        devices.append(DevicePlan("disk", int(sizes["disk"]), 0))
    if "disk" in sizes:
        notes.append("layers on disk are read on every forward: the probe times it, the estimate follows")
    if processes > 1:
        notes.append(f"each of the {processes} processes holds the whole layout above (data parallel)")
    plan = JobPlan(job=job, model=name, family=family, dtype=str(torch_dtype).removeprefix("torch."),
                   parameters=n_params, geometry=geometry.to_dict(), layout=layout, devices=devices,
                   processes=processes, work=work, forward_equivalents=0.0, shape=shape, notes=notes)
    if not probe:
        return plan
    probe_handle = handle or load_model(model, device=device, dtype=dtype, device_map=device_map,
                                        max_memory=max_memory)
    batch, tokens = shape.batch_size, min(shape.max_length, 512)
    seconds = probe_seconds(probe_handle, batch, tokens, probe_repeats)
    probe_tokens = batch * tokens
    return replace(plan, probe_tokens=probe_tokens, probe_seconds=seconds,
                   forward_equivalents=token_forwards / probe_tokens,
                   estimated_seconds=token_forwards / probe_tokens * seconds)
