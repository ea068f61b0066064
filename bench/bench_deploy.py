"""SmolLM2 dense and pruned, exported to GGUF and measured in llama.cpp itself: perplexity and tokens/s.

    make llama-cpp                                      # once: llama.cpp's tools (~10 min)
    python bench/bench_deploy.py                        # dense + width -20% (per layer, FFN blocks 1/32/256)
    python bench/bench_deploy.py --keeps 0.9,0.8,0.7 --aligns 32
    python bench/bench_deploy.py --variants 0.8:1,0.8:32,0.8:256,0.9:32,0.7:32 --types q8_0,Q4_K_M --rounds 1

Protocol:
- masks: `obs` per layer (headlab.engine.pruning.strategies.reconstruct.width_by_reconstruction) chosen on
  32 WikiText-2 paragraphs from the END of the test file (validation text), at --keeps of the
  parameters; `--aligns` rounds every layer's kept FFN channels to whole blocks (1: no rounding,
  32: Q8_0 blocks, 256: K-quant blocks) before OBS chooses. Cached in ~/.cache/headlab/bench/deploy.
- files: HeadLab's GGUF writer at f16 and q8_0; Q4_K_M from llama-quantize on the f16 file.
- llama.cpp perplexity: `llama-perplexity -c 512 --chunks 12` on the shipped WikiText-2 test file
  (second half of each chunk scored). HeadLab's column computes that protocol on the masked float32
  model with llama.cpp's own token ids (headlab.engine.runtime.half_window); ratio columns divide
  by the dense model of the same type in the same run.
- speed: `llama-bench -p 512 -n 128 -r 3` at --threads (1 by default), every file once per round for
  --rounds interleaved rounds, medians; ideal = dense weight bytes /
  pruned weight bytes of the same type (every weight is read once per generated token).
Results: bench/results/deploy.csv (merged by row key, each row dated).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import statistics
import sys
from pathlib import Path

import gguf
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import WIKITEXT_FILE
from headlab.engine.export import llama_cpp
from headlab.engine.export.gguf import write_gguf
from headlab.engine.export.surgery import prune
from headlab.engine.models.load import cache_dir, load_model, shipped_gguf
from headlab.engine.pruning.size_target import reach_size
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.pruning.strategies.reconstruct import width_by_reconstruction
from headlab.engine.runtime.half_window import half_window_perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "deploy.csv"
COLUMNS = ["row", "type", "threads", "arch", "params_M", "weight_MB", "ppl_llama_cpp", "ppl_ratio", "ppl_headlab",
           "headlab_vs_llama_cpp", "pp512_tps", "tg128_tps", "tg_speedup", "ideal_speedup", "fraction_of_ideal",
           "f16_fallbacks", "measured"]


def weight_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


VARIANT_KINDS = ("width", "even", "uniform", "depth")


def parse_variant(spec: str) -> tuple[str, float, int]:
    """"kind:keep[:align]" (kind: width = per layer, even = per layer with equal GQA groups, uniform, depth),
    or the older "keep:align" (per layer)."""
    parts = spec.split(":")
    kind = parts.pop(0) if parts[0] in VARIANT_KINDS else "width"
    keep, align = float(parts[0]), int(parts[1]) if len(parts) > 1 else 1
    if kind == "depth" and align != 1:
        raise ValueError(f"{spec}: depth drops whole layers; it takes no FFN block size")
    return kind, keep, align


def variant_label(kind: str, keep: float, align: int) -> str:
    pct = f"{100 * (1 - keep):.0f}%"
    return {"width": f"width-{pct} per layer, FFN blocks {align}",
            "even": f"width-{pct} per layer, FFN blocks {align}, even GQA groups",
            "uniform": f"width-{pct} uniform, FFN blocks {align}",
            "depth": f"depth-{pct}"}[kind]


def mask_for(handle, kind: str, keep: float, align: int, work: Path, calib: Calibration) -> PruneMask:
    pct = round(100 * (1 - keep))
    name = {"width": f"width{pct}-align{align}", "even": f"width{pct}-align{align}-even",
            "uniform": f"uniform{pct}-align{align}", "depth": f"depth{pct}"}[kind]
    path = work / "masks" / f"{name}.json"
    if path.exists():
        return PruneMask.load(path, handle.geometry)
    print(f"choosing the mask {variant_label(kind, keep, align)}...", flush=True)
    if kind == "depth":  # what `headlab export --keep K --route depth` chooses
        mask = reach_size(handle, keep, route="depth", texts=calib.texts).mask
    else:
        mask = width_by_reconstruction(handle, keep, calib, uniform=kind == "uniform", ffn_align=align,
                                       even_groups=kind == "even").mask
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", default="0.8")
    ap.add_argument("--aligns", default="1,32,256")
    ap.add_argument("--variants", default=None,
                    help="kind:keep[:align] instead of --keeps x --aligns (kind: width = per layer, even = per "
                         "layer with equal GQA groups, uniform, depth), e.g. even:0.8:32,uniform:0.8:32,depth:0.8")
    ap.add_argument("--types", default="f16,q8_0,Q4_K_M")
    ap.add_argument("--threads", default="1", help="llama-bench threads, one or more (1,2)")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--masks-only", action="store_true", help="choose and cache the masks, measure nothing")
    ap.add_argument("--rounds", type=int, default=3, help="llama-bench passes over every file (medians reported)")
    ap.add_argument("--fresh", action="store_true", help="rewrite the files and measure perplexity again")
    ap.add_argument("--csv", default=str(RESULTS), help="results table (rows merged by row and type)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = cache_dir() / "bench" / "deploy"
    (work / "gguf").mkdir(parents=True, exist_ok=True)
    handle = load_model()
    calib = Calibration.shipped("wikitext", 32, max_length=256)
    variants: list[tuple[str, PruneMask | None]] = [("dense", None)]
    specs = ([parse_variant(v) for v in args.variants.split(",")] if args.variants
             else [("width", float(k), int(a)) for k in args.keeps.split(",") for a in args.aligns.split(",")])
    for kind, keep, align in specs:
        variants.append((variant_label(kind, keep, align), mask_for(handle, kind, keep, align, work, calib)))
    threads = [int(t) for t in args.threads.split(",")]
    if args.masks_only:
        return
    llama_cpp.find_tools()
    print(f"# bench_deploy: {handle.name} on {cpu_name()}; llama.cpp from llama-cpp-python "
          f"{llama_cpp.LLAMA_CPP_PYTHON}; llama-bench -p 512 -n 128 -r 3 -t {args.threads}; "
          f"llama-perplexity -c 512 --chunks {args.chunks} on {WIKITEXT_FILE.name}", flush=True)
    today = dt.date.today().isoformat()
    done_path = work / "perplexities.json"  # (row, type) -> file facts and perplexities: a rerun resumes
    done = json.loads(done_path.read_text()) if done_path.exists() and not args.fresh else {}
    files: list[tuple[str, str, Path]] = []
    for label, mask in variants:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        paths = {t: work / "gguf" / f"{slug}-{t}.gguf" for t in args.types.split(",")}
        if all(f"{label}|{t}" in done and p.exists() for t, p in paths.items()):
            files += [(label, t, p) for t, p in paths.items()]
            continue
        model = handle if mask is None else prune(handle, mask)
        f16 = work / "gguf" / f"{slug}-f16.gguf"  # K-quants are made from it, and it tokenizes the text
        infos = {"f16": write_gguf(model, f16, "f16", tokenizer_gguf=shipped_gguf(handle.name))}
        for t, path in paths.items():
            if t in ("q8_0", "f32", "bf16"):
                infos[t] = write_gguf(model, path, t, tokenizer_gguf=shipped_gguf(handle.name))
            elif t != "f16":
                llama_cpp.quantize(f16, path, t)
                infos[t] = infos["f16"]
        ids = llama_cpp.tokenize(f16, WIKITEXT_FILE)
        ours = half_window_perplexity(handle, ids, 512, mask=mask, n_chunks=args.chunks).perplexity
        for t, path in paths.items():
            done[f"{label}|{t}"] = {"arch": infos[t].arch, "params": infos[t].params_written,
                                    "fallbacks": len(infos[t].fallbacks), "bytes": weight_bytes(path),
                                    "ppl": llama_cpp.perplexity(path, WIKITEXT_FILE, 512, chunks=args.chunks),
                                    "ours": ours}
            files.append((label, t, path))
            print(label, t, done[f"{label}|{t}"], flush=True)
        done_path.write_text(json.dumps(done, indent=1))
    # Speed: every file once per round, rounds interleaved so drift on a shared machine hits all alike; medians.
    speeds: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for n in threads:
            for label, t, path in files:
                speeds.setdefault(f"{label}|{t}|{n}", []).append(llama_cpp.bench(path, threads=n))
        print(f"speed round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for n in threads:
        for label, t, _ in files:
            rows.append(_row(done, speeds, label, t, n, today))
    out = Path(args.csv)
    key = ("row", "type", "threads")
    merged = ({tuple(r.get(k) or "1" for k in key): r for r in _read(out)}
              | {tuple(str(r[k]) for k in key): r for r in rows})
    out.parent.mkdir(exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({**r, "threads": r.get("threads") or 1} for r in merged.values())
    print("\n| row | type | threads | arch | params | weights MB | llama.cpp ppl (x dense) | HeadLab ppl | tg128 tok/s | "
          "speed-up (ideal, fraction) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in merged.values():
        print(f"| {r['row']} | {r['type']} | {r.get('threads') or 1} | {r['arch']} | {r['params_M']}M | "
              f"{r['weight_MB']} | {r['ppl_llama_cpp']} ({r['ppl_ratio']}x) | {r['ppl_headlab']} | {r['tg128_tps']} | "
              f"{r['tg_speedup']}x ({r['ideal_speedup']}x, {r['fraction_of_ideal']}) |")


def _row(done: dict, speeds: dict, label: str, t: str, n: int, today: str) -> dict:
    f, d = done[f"{label}|{t}"], done[f"dense|{t}"]
    tg = statistics.median(x["generate"] for x in speeds[f"{label}|{t}|{n}"])
    pp = statistics.median(x["prompt"] for x in speeds[f"{label}|{t}|{n}"])
    tg_dense = statistics.median(x["generate"] for x in speeds[f"dense|{t}|{n}"])
    return {
        "row": label, "type": t, "threads": n, "arch": f["arch"], "params_M": round(f["params"] / 1e6, 2),
        "weight_MB": round(f["bytes"] / 1e6, 1), "ppl_llama_cpp": round(f["ppl"], 4),
        "ppl_ratio": round(f["ppl"] / d["ppl"], 3), "ppl_headlab": round(f["ours"], 4),
        "headlab_vs_llama_cpp": round(f["ppl"] / f["ours"] - 1, 5) if t == "f16" else "",
        "pp512_tps": round(pp, 1), "tg128_tps": round(tg, 1), "tg_speedup": round(tg / tg_dense, 3),
        "ideal_speedup": round(d["bytes"] / f["bytes"], 3),
        "fraction_of_ideal": round((tg / tg_dense) / (d["bytes"] / f["bytes"]), 3),
        "f16_fallbacks": f["fallbacks"] if t == "q8_0" else "", "measured": today,
    }


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
