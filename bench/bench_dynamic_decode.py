"""Batch-1 decode speed with per-token sparsity (CATS, importance networks) vs dense, and how much of the ideal it reaches.

    python bench/bench_dynamic_decode.py [--threads 1] [--sparsities 0.25,0.5,0.7] [--ipn-targets 0.5]
                                         [--ipn FOLDER ...] [--new 128] [--prompt 32] [--backend auto]

One process, one model. Setup on all cores: CATS thresholds calibrated per target sparsity
(headlab.engine.dynamic.calibrate), an untrained importance network per --ipn-targets entry
(headlab.engine.dynamic.ipn.untrained_ipn: the oracle's score on 4-bit weight sketches, calibrated
thresholds) and any trained network saved with save_ipn (--ipn FOLDER). Then timing on
`--threads` torch threads: greedy decoding of `--new` tokens after a `--prompt`-token WikiText
prompt with the KV cache, dense (headlab.engine.dynamic.dense_generate) and sparse (sparse_generate: each
token reads only its kept channels' weights, and its kept heads' Q rows and O columns when the
chooser picks heads), round-robin over `--repeats` so CPU drifts hit all alike; tokens/s count the
cached decode steps only (the prefill is excluded).

Columns: ideal = weight bytes read per token, dense / sparse (headlab.engine.dynamic.decode_weight_bytes:
embedding row, attention (kept heads' Q and O), K/V in full, kept channels' FFN weights at the
mean kept count per layer measured in the same decode, what the chooser reads itself: CATS the
whole gate, a network its sketches; final norm, LM head); fraction of ideal = speedup / ideal;
predictor overhead = time spent in the chooser per decoded token / time of a dense token (CATS's
includes its full gate mat-vec); FFN path = the kernel that ran (compiled CPU kernel, Triton, or
the torch fallback); same greedy prefix = leading new tokens equal to dense decoding.

Native precision (the shipped SmolLM2 is a Q4_1 model dequantised to float32): a "dense int4" row decodes with
every FFN at 4 bits, 16 levels per group of 32 inputs, through PyTorch's CPU int4 kernel when it runs here
(headlab.engine.dynamic.int4; ffn_path "int4 kernel", else "int4 dequantise-per-call", a slow fallback), attention
and LM head float32; precision says which rows are which, and speedup_same_precision compares a row with the dense
row of its own precision. Every importance-network row runs twice: in float32, and as "<row> int4", its kept
channels read at 4 bits (the dense int4 row's own levels laid out channel-major, the compiled kernel's
gathered_ffn_q4; headlab.engine.dynamic.int4_gathered); fraction_of_ideal compares its speed-up over dense int4
with ideal_speedup, dense-int4 bytes over the bytes it reads with its kept channels and its predictor at 4 bits. A "llama.cpp Q4_1" row runs llama-bench on the shipped GGUF
(every weight at 4 bits, `--threads` threads, generation from an empty context) when `make llama-cpp` has built
the tools; otherwise the run says so and goes on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.machine import cpu_name
from headlab.engine.core.csvfile import write_rows
from headlab.engine.data.datasets import read_wikitext
from headlab.engine.dynamic import (
    CatsChooser,
    IPNChooser,
    calibrate,
    decode_weight_bytes,
    dense_generate,
    sparse_generate,
)
from headlab.engine.dynamic.int4 import int4_decode_weight_bytes, int4_ffn, int4_generate
from headlab.engine.dynamic.int4_gathered import int4_interleaved_ffn, int4_sparse_generate
from headlab.engine.dynamic.ipn import load_ipn, untrained_ipn
from headlab.engine.dynamic.rotation import ALIGNED
from headlab.engine.export import llama_cpp
from headlab.engine.models.load import load_model, shipped_gguf

#: Rows whose FFN runs at 4 bits (the others are float32).
INT4_DENSE = "dense int4"
INT4_SUFFIX = " int4"  # a sparse row whose kept channels are read at 4 bits (int4_sparse_generate)
LLAMA_CPP = "llama.cpp Q4_1"


def _prompt(handle, n: int) -> torch.Tensor:
    """n tokens from the second half of the WikiText-2 test file (the calibration set is its first part)."""
    text = read_wikitext()
    ids = handle.tokenizer(text[len(text) // 2:], add_special_tokens=False)["input_ids"][:n]
    return torch.tensor(ids)[None]


def _same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading new tokens two continuations share."""
    diff = (a != b).nonzero()
    return int(diff[0]) if diff.numel() else a.numel()


def _choosers(handle, args) -> dict[str, tuple[object, float]]:
    """label -> (chooser, target FFN sparsity), made on all cores before timing."""
    out: dict[str, tuple[object, float]] = {}
    for s in (float(v) for v in args.sparsities.split(",") if v):
        out[f"cats {s:.0%}"] = (CatsChooser(handle, calibrate(handle, "cats", s)), s)
    for s in (float(v) for v in args.ipn_targets.split(",") if v):
        out[f"ipn untrained {s:.0%}"] = (IPNChooser(handle, untrained_ipn(handle, s)), s)
    for folder in args.ipn:
        ipn = load_ipn(handle, folder)
        name = "ipn-aligned" if ipn.sketch == ALIGNED else "ipn"  # the sketch as bench_dynamic names its rows
        out[f"{name} {Path(folder).name}"] = (IPNChooser(handle, ipn), ipn.target)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    ap.add_argument("--sparsities", default="0.25,0.5,0.7", help="CATS target FFN sparsities ('' for none)")
    ap.add_argument("--ipn-targets", default="0.5", help="untrained importance networks' target sparsities")
    ap.add_argument("--ipn", action="append", default=[], help="a trained network's folder (save_ipn); repeatable")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", default="auto", choices=["auto", "compiled", "torch", "triton"],
                    help="the sparse FFN kernel")
    ap.add_argument("--no-int4", action="store_true", help="skip the dense int4 row")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp row")
    ap.add_argument("--csv", default="bench/results/dynamic_decode.csv")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    handle = load_model(args.model, dtype="float32")
    prompt = _prompt(handle, args.prompt)
    choosers = _choosers(handle, args)
    if not args.no_int4:
        int4_ffn(handle)  # quantised on all cores, before timing
        int4_interleaved_ffn(handle)
    t_setup = time.perf_counter() - t

    torch.set_num_threads(args.threads)
    runs = {"dense": lambda n: dense_generate(handle, prompt, n)}
    if not args.no_int4:
        runs[INT4_DENSE] = lambda n: int4_generate(handle, prompt, n)
    runs.update({label: (lambda n, c=c: sparse_generate(handle, prompt, c, n, backend=args.backend))
                 for label, (c, _) in choosers.items()})
    if not args.no_int4:  # the networks' rows again, their kept channels read at 4 bits (CATS computes a float gate)
        int4_backend = "auto" if args.backend in ("auto", "compiled") else "torch"
        runs.update({label + INT4_SUFFIX: (lambda n, c=c: int4_sparse_generate(handle, prompt, c, n,
                                                                                 backend=int4_backend))
                     for label, (c, _) in choosers.items() if not c.computes_gate})
    for run in runs.values():  # warm-up; also makes the interleaved FFN copies
        run(4)
    results: dict[str, list] = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, run in runs.items():
            results[label].append(run(args.new))

    g = handle.geometry
    dense_bytes = decode_weight_bytes(handle)
    int4_bytes = int4_decode_weight_bytes(handle)
    dense_tps = statistics.median(r.decode_tokens_per_s for r in results["dense"])
    int4_tps = statistics.median(r.decode_tokens_per_s for r in results[INT4_DENSE]) if INT4_DENSE in results else None
    dense_new = results["dense"][0].new_tokens
    rows = []
    for label, gens in results.items():
        first = gens[0]
        sparse_int4 = label.endswith(INT4_SUFFIX)
        chooser, target = choosers.get(label.removesuffix(INT4_SUFFIX) if sparse_int4 else label, (None, 0.0))
        int4 = label == INT4_DENSE or sparse_int4
        tps = statistics.median(r.decode_tokens_per_s for r in gens)
        if sparse_int4:
            sparse_bytes = int4_decode_weight_bytes(handle, first.kept, chooser=chooser)
        elif int4:
            sparse_bytes = int4_bytes
        else:
            sparse_bytes = (dense_bytes if chooser is None
                            else decode_weight_bytes(handle, first.kept, first.heads, chooser=chooser))
        ideal = (int4_bytes if int4 else dense_bytes) / sparse_bytes
        speedup = tps / dense_tps
        same_precision = tps / int4_tps if int4 else speedup
        ideal_int4 = None
        if chooser is not None and first.heads is None:  # the int4 byte count covers FFN sparsity only
            ideal_int4 = int4_bytes / int4_decode_weight_bytes(handle, first.kept, chooser=chooser)
        chooser_per_token = statistics.median(r.chooser_s / r.decoded for r in gens)
        rows.append({
            "config": label,
            "precision": "int4 FFN" if int4 else "fp32",
            "chooser": first.chooser or "-",
            "ffn_path": first.ffn_path or "dense",
            "target_sparsity": target,
            "decode_ffn_sparsity": 0.0 if first.kept is None else 1.0 - float(first.kept.float().mean()) / g.ffn_dim,
            "decode_head_sparsity": 0.0 if first.heads is None else 1.0 - float(first.heads.float().mean()) / g.n_heads,
            "tokens_per_s": tps,
            "speedup": speedup,
            "speedup_same_precision": same_precision,
            "weight_mb_per_token": sparse_bytes / 2**20,
            "ideal_speedup": ideal,
            "ideal_int4_speedup": ideal_int4,
            "fraction_of_ideal": same_precision / ideal,
            "predictor_overhead": chooser_per_token * dense_tps,  # chooser time per token / dense token time
            "same_tokens_as_dense": _same_prefix(first.new_tokens, dense_new),
            "new_tokens": args.new,
            "prompt_tokens": args.prompt,
            "threads": args.threads,
            "repeats": args.repeats,
            "model": handle.name,
        })
    if not args.no_llama_cpp:
        rows += _llama_cpp_row(handle, args, dense_tps)

    print(f"\n# bench_dynamic_decode: {handle.name}, fp32 (int4 FFN in the {INT4_DENSE} and *{INT4_SUFFIX} rows), batch 1, {args.threads} torch thread(s) on {cpu_name()}")
    print(f"# {args.prompt}-token prompt + {args.new} greedy tokens with the KV cache; median of {args.repeats} runs "
          f"(decode steps only); setup (load + calibration) {t_setup:.0f} s")
    print("# ideal = weight bytes read per token, dense / sparse (chooser's own reads included); "
          "fraction of ideal = speedup / ideal;")
    print("# predictor overhead = chooser time per token / dense token time; timings on a shared machine are noisy\n")
    print("| config | precision | FFN path | FFN sparsity | head sparsity | tok/s | speedup | same precision | "
          "MB read/token | ideal | fraction of ideal | ideal at int4 | predictor overhead | same greedy prefix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(v, spec: str, suffix: str = "") -> str:
        return "-" if v is None else format(v, spec) + suffix

    for r in rows:
        sparse = r["config"] not in ("dense", INT4_DENSE, LLAMA_CPP)
        print(f"| {r['config']} | {r['precision']} | {r['ffn_path']} | {cell(r.get('decode_ffn_sparsity'), '.1%')} | "
              f"{cell(r.get('decode_head_sparsity'), '.1%')} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{cell(r.get('speedup_same_precision'), '.2f', 'x')} | {cell(r.get('weight_mb_per_token'), '.0f')} | "
              f"{cell(r.get('ideal_speedup'), '.2f', 'x')} | "
              f"{cell(r['fraction_of_ideal'] if sparse else None, '.0%')} | "
              f"{cell(r.get('ideal_int4_speedup'), '.2f', 'x')} | "
              f"{cell(r['predictor_overhead'] if sparse else None, '.1%')} | "
              f"{cell(r.get('same_tokens_as_dense'), 'd')}/{args.new} |")
    for r in rows:
        if r.get("ideal_int4_speedup") is not None:
            print(f"# {r['config']} at 4 bits: at most {r['ideal_int4_speedup']:.2f}x the dense int4 decode "
                  f"(bytes read per token, its predictor included); the target is >= 1.15x")
    print(f"\nwrote {write_rows(rows, args.csv)}")


def _llama_cpp_row(handle, args, dense_tps: float) -> list[dict]:
    """llama-bench on the shipped Q4_1 GGUF at `--threads` threads, or nothing (and why) when it cannot run."""
    gguf = shipped_gguf(handle.name)
    if gguf is None:
        print(f"# llama.cpp row skipped: {handle.name} is not a shipped model with a GGUF file")
        return []
    try:
        speed = llama_cpp.bench(gguf, prompt=args.prompt, generate=args.new, threads=args.threads,
                                repetitions=args.repeats)
    except llama_cpp.LlamaCppMissing as e:
        print(f"# llama.cpp row skipped: {e}")
        return []
    except llama_cpp.LlamaCppError as e:
        print(f"# llama.cpp row skipped: llama-bench failed: {e}")
        return []
    tps = speed["generate"]
    return [{"config": LLAMA_CPP, "precision": "Q4_1 (every weight)", "chooser": "-", "ffn_path": "llama.cpp",
             "target_sparsity": 0.0, "tokens_per_s": tps, "speedup": tps / dense_tps, "new_tokens": args.new,
             "prompt_tokens": args.prompt, "threads": args.threads, "repeats": args.repeats, "model": handle.name,
             "fraction_of_ideal": None, "predictor_overhead": None}]


if __name__ == "__main__":
    main()
