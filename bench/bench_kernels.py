"""Masked kernels vs dense compute: does pruning X% of heads/channels save X% of the time?

For each sparsity (share of heads or FFN channels pruned) it times
  dense      the unpruned op (torch SDPA / F.linear): what zeroing-by-multiplication costs
  reference  the torch twin (headlab.kernels.reference): gathers kept weights/heads, then dense op
  compacted  the dense op on weights/heads sliced beforehand: a physically pruned model
  kernel     our Triton kernel (CUDA only)
and prints speedups vs dense next to the ideal 1 / (1 - sparsity).

    python bench/bench_kernels.py            # Llama-like shapes on CUDA, --small on CPU
    python bench/bench_kernels.py --small --csv out.csv

GPU timings use CUDA events after warmup (which also runs Triton's autotuning), median of
repeats; CPU timings use perf_counter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    # run as `python bench/bench_kernels.py` from a checkout: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headlab.engine.core.csvfile import write_rows  # noqa: E402
from headlab.kernels import (  # noqa: E402
    col_sparse_linear,
    grouped_row_sparse_linear,
    head_sparse_attention,
    pad_keep_indices,
    reference,
    row_sparse_linear,
)

SPARSITIES = (0.0, 0.25, 0.5, 0.75)
Cases = dict[str, Callable[[], object]]  # implementation name -> one call of it


@dataclass(frozen=True)
class Shape:
    """Benchmark problem sizes."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int


LLAMA = Shape(batch=8, seq=2048, heads=32, kv_heads=8, head_dim=128, hidden=4096, ffn=14336)
SMALL = Shape(batch=2, seq=256, heads=8, kv_heads=2, head_dim=64, hidden=512, ffn=1536)  # SmolLM2-like widths


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _kept(n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted random keep index of round((1 - sparsity) * n) of n features, on gen's device."""
    n_kept = round((1 - sparsity) * n)
    return torch.randperm(n, generator=gen, device=gen.device)[:n_kept].sort().values


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Normal samples made on gen's device (Llama-sized tensors are slow to make on a CPU)."""
    return torch.randn(*shape, generator=gen, device=gen.device).mul_(scale).to(dtype)


def attention_cases(s: Shape, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> Cases:
    """Causal GQA attention with a share of query heads pruned (same heads in every sample)."""
    q = _randn(s.batch, s.heads, s.seq, s.head_dim, gen=gen, dtype=dtype)
    k = _randn(s.batch, s.kv_heads, s.seq, s.head_dim, gen=gen, dtype=dtype)
    v = _randn(s.batch, s.kv_heads, s.seq, s.head_dim, gen=gen, dtype=dtype)
    kept = _kept(s.heads, sparsity, gen)
    keep = torch.zeros(s.heads, dtype=torch.bool, device=gen.device)
    keep[kept] = True
    group = s.heads // s.kv_heads  # query heads per KV head
    # KV repeated per query head beforehand: the layout torch's fastest (flash) SDPA takes,
    # so dense is the strongest baseline, not one slowed by a GQA fallback
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, D)
    q_c = q[:, kept].contiguous()  # (B, H_kept, T, D): what a sliced model holds
    k_c, v_c = k_rep[:, kept].contiguous(), v_rep[:, kept].contiguous()
    return {
        "dense": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True),
        "reference": lambda: head_sparse_attention(q, k, v, keep, backend="torch"),
        "compacted": lambda: F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True),
        "kernel": lambda: head_sparse_attention(q, k, v, keep, backend="triton"),
    }


def ffn_up_cases(s: Shape, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> Cases:
    """FFN up projection hidden -> ffn, a share of output channels pruned."""
    x = _randn(s.batch * s.seq, s.hidden, gen=gen, dtype=dtype)
    w = _randn(s.ffn, s.hidden, gen=gen, dtype=dtype, scale=s.hidden**-0.5)
    keep = _kept(s.ffn, sparsity, gen)
    w_c = w[keep].contiguous()
    return {
        "dense": lambda: F.linear(x, w),
        "reference": lambda: reference.row_sparse_linear(x, w, None, keep),
        "compacted": lambda: F.linear(x, w_c),
        "kernel": lambda: row_sparse_linear(x, w, None, keep, backend="triton"),
    }


def ffn_down_cases(s: Shape, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> Cases:
    """FFN down projection ffn -> hidden from the compact activations of the kept channels."""
    keep = _kept(s.ffn, sparsity, gen)
    h_full = _randn(s.batch * s.seq, s.ffn, gen=gen, dtype=dtype)
    h = h_full[:, keep].contiguous()  # (tokens, kept): what the up projection produced
    w = _randn(s.hidden, s.ffn, gen=gen, dtype=dtype, scale=s.ffn**-0.5)
    w_c = w[:, keep].contiguous()
    return {
        "dense": lambda: F.linear(h_full, w),
        "reference": lambda: reference.col_sparse_linear(h, w, None, keep, compact_input=True),
        "compacted": lambda: F.linear(h, w_c),
        "kernel": lambda: col_sparse_linear(h, w, None, keep, compact_input=True, backend="triton"),
    }


def ffn_up_grouped_cases(s: Shape, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> Cases:
    """FFN up projection where each sample was routed to one of 4 masks of equal sparsity."""
    x = _randn(s.batch, s.seq, s.hidden, gen=gen, dtype=dtype)
    w = _randn(s.ffn, s.hidden, gen=gen, dtype=dtype, scale=s.hidden**-0.5)
    keeps = [_kept(s.ffn, sparsity, gen) for _ in range(4)]
    padded = pad_keep_indices(keeps)
    group_ids = torch.arange(s.batch, device=gen.device) % 4
    # compacted bound: each group's sliced weights applied to its own samples, slices made beforehand
    slices = [(torch.nonzero(group_ids == g).squeeze(1), w[k].contiguous()) for g, k in enumerate(keeps)]
    return {
        "dense": lambda: F.linear(x, w),
        "reference": lambda: grouped_row_sparse_linear(x, w, None, padded, group_ids, backend="torch"),
        "compacted": lambda: [F.linear(x[rows], w_g) for rows, w_g in slices],
        "kernel": lambda: grouped_row_sparse_linear(x, w, None, padded, group_ids, backend="triton"),
    }


OPS = {
    "attention": attention_cases,
    "ffn_up": ffn_up_cases,
    "ffn_down": ffn_down_cases,
    "ffn_up_4_masks": ffn_up_grouped_cases,
}


def run(shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> list[dict]:
    """Time every op x sparsity x implementation; one row per (op, sparsity)."""
    with_kernel = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for op, make in OPS.items():
        for sparsity in SPARSITIES:
            cases = make(shape, sparsity, dtype, gen)
            if not with_kernel:
                cases.pop("kernel")
            with torch.no_grad():
                ms = {name: time_ms(fn, device, warmup, repeats) for name, fn in cases.items()}
            row = {"op": op, "sparsity": sparsity, "ideal_speedup": 1 / (1 - sparsity)}
            for name in ("dense", "reference", "compacted", "kernel"):
                row[f"{name}_ms"] = ms.get(name)
                if name != "dense":
                    row[f"{name}_speedup"] = ms["dense"] / ms[name] if name in ms else None
            rows.append(row)
            del cases
    return rows


def print_table(rows: list[dict]) -> None:
    """Print rows as an aligned text table (n/a where a figure was not measured)."""
    columns = [
        ("op", "op", "{}"),
        ("sparsity", "pruned", "{:.0%}"),
        ("dense_ms", "dense ms", "{:.3f}"),
        ("reference_ms", "ref ms", "{:.3f}"),
        ("compacted_ms", "compact ms", "{:.3f}"),
        ("kernel_ms", "kernel ms", "{:.3f}"),
        ("reference_speedup", "ref x", "{:.2f}"),
        ("compacted_speedup", "compact x", "{:.2f}"),
        ("kernel_speedup", "kernel x", "{:.2f}"),
        ("ideal_speedup", "ideal x", "{:.2f}"),
    ]
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append(["n/a" if row[key] is None else fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes (the default without CUDA)")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine, multi-threaded timings "
                        "measure preemption more than compute)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = SMALL if args.small or not cuda else LLAMA
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    repeats = args.repeats or (20 if cuda else 15)
    warmup = 5 if cuda else 2
    if not cuda:
        torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {where}, dtype: {dtype}, shape: {shape}")
    print(f"median of {repeats} runs after {warmup} warmup; speedups are dense ms / ms")
    if not cuda:
        print("No CUDA: timing dense vs the torch reference only. Triton kernel figures need a CUDA GPU.")
    rows = run(shape, device, dtype, warmup, repeats)
    print_table(rows)
    if args.csv:
        write_rows(rows, args.csv)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
