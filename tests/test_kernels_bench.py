"""The kernel benchmark runs end to end (on a tiny shape) and writes its table as CSV."""

import csv

import torch

from bench.bench_kernels import OPS, SPARSITIES, Shape, print_table, run
from headlab.engine.core.csvfile import write_rows

TINY = Shape(batch=2, seq=16, heads=4, kv_heads=2, head_dim=16, hidden=32, ffn=64)


def test_benchmark_times_every_op_and_sparsity_and_writes_csv(tmp_path, capsys):
    rows = run(TINY, torch.device("cpu"), torch.float32, warmup=0, repeats=1)
    assert [(r["op"], r["sparsity"]) for r in rows] == [(op, s) for op in OPS for s in SPARSITIES]
    assert all(r["dense_ms"] > 0 and r["reference_ms"] > 0 and r["kernel_ms"] is None for r in rows)
    assert [r["ideal_speedup"] for r in rows[:4]] == [1.0, 4 / 3, 2.0, 4.0]
    print_table(rows)
    assert "n/a" in capsys.readouterr().out  # no kernel figures without CUDA
    write_rows(rows, tmp_path / "kernels.csv")
    with (tmp_path / "kernels.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
