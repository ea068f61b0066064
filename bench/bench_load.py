"""The app under load: N browser sessions toggling heads at once; click-to-perplexity latency and server memory.

    python bench/bench_load.py                               # the shipped SmolLM2, N = 1, 2, 4 (minutes; an idle machine)
    python bench/bench_load.py --model tiny --clicks 3 --rounds 1 --out /tmp/load.csv    # a few-second smoke run

For each N a fresh `streamlit run app.py` starts on 127.0.0.1 (tests/browser.py), and N chromium
sessions (one browser, a context each: separate Streamlit sessions) open the Heads page at once:
that is the cold start (time until every session shows its perplexity; server RSS and peak RSS
after it). Then, for `rounds` rounds, every session clicks `clicks` different heads of the first
head grid, one after the other, all sessions at the same time. Latency = from the click to the
moment the "Perplexity, with mask" value on that page changes (polled every 20 ms); the next
click waits until the page is idle again. Server RSS is sampled every 0.2 s.

Prints a markdown table per N and the targets (median <= 1.5 s for one session, <= 3 s for four;
the cold start of four sessions within 1.3x the peak memory of one), and writes a CSV of the
table (`--out`) and one of every click (same name, `_clicks` appended).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import numpy as np  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402

from headlab.engine.core.csvfile import write_rows  # noqa: E402
from tests.browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, grid_cell, save_tiny_llama, streamlit_app  # noqa: E402

POLL_S = 0.02
TARGET_MEDIAN_S = {1: 1.5, 4: 3.0}
TARGET_COLD_RATIO = 1.3


def _status_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


async def _sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _status_mb(pid)["VmRSS"])
        await asyncio.sleep(0.2)


async def _masked(page) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Perplexity, with mask").first
    return await metric.locator('[data-testid="stMetricValue"]').inner_text(timeout=2000)


async def _wait_idle(page, timeout: float) -> None:
    deadline, quiet_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        running = await page.locator('[data-testid="stStatusWidget"]').count() > 0
        now = time.monotonic()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since > 1.0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the app kept running past the timeout")


async def _open(page, url: str, timeout: float) -> None:
    await page.goto(url, wait_until="domcontentloaded")
    await page.get_by_text("Perplexity, with mask").first.wait_for(timeout=timeout * 1000)
    await grid_cell(page, 0, 0, 0).wait_for(timeout=timeout * 1000)
    await _wait_idle(page, timeout)


async def _grid_shape(page) -> tuple[int, int]:
    cells = page.locator('[data-testid="stBidiComponentIsolated"]').first.locator(".cell")
    last = cells.last
    return int(await last.get_attribute("data-layer")) + 1, int(await last.get_attribute("data-head")) + 1


async def _click_and_time(page, cells: list[tuple[int, int]], timeout: float) -> list[float]:
    """Seconds from each click to the new perplexity on the page (nan when it never changed)."""
    out = []
    for layer, head in cells:
        before = await _masked(page)
        t0 = time.perf_counter()
        await grid_cell(page, 0, layer, head).click()
        seconds = float("nan")
        while time.perf_counter() - t0 < timeout:
            try:
                now = await _masked(page)
            except Exception:  # the metric is being re-drawn
                now = before
            if now != before:
                seconds = time.perf_counter() - t0
                break
            await asyncio.sleep(POLL_S)
        out.append(seconds)
        await _wait_idle(page, timeout)
    return out


async def run_sessions(url: str, pid: int, n: int, clicks: int, rounds: int, seed: int, timeout: float) -> tuple[dict, list]:
    """One N: cold start of n sessions, then `rounds` rounds of `clicks` clicks each; (summary row, click rows)."""
    peak, stop = [0.0], asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(pid, peak, stop))
    base = _status_mb(pid)["VmRSS"]
    async with async_playwright() as p:
        assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make setup-browser`"
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pages = [await (await browser.new_context(viewport=VIEWPORT)).new_page() for _ in range(n)]
        t0 = time.perf_counter()
        await asyncio.gather(*(_open(page, url, timeout) for page in pages))
        cold_s = time.perf_counter() - t0
        cold = _status_mb(pid)
        n_layers, n_heads = await _grid_shape(pages[0])
        rng = random.Random(seed)
        plans = [rng.sample([(l, h) for l in range(n_layers) for h in range(n_heads)], clicks * rounds)
                 for _ in range(n)]
        rows, after_round = [], []
        for r in range(rounds):
            times = await asyncio.gather(*(_click_and_time(page, plans[s][r * clicks:(r + 1) * clicks], timeout)
                                           for s, page in enumerate(pages)))
            after_round.append(_status_mb(pid)["VmRSS"])
            for s, ts in enumerate(times):
                for (layer, head), t in zip(plans[s][r * clicks:(r + 1) * clicks], ts):
                    rows.append({"sessions": n, "session": s, "round": r + 1, "layer": layer, "head": head,
                                 "seconds": round(t, 4)})
        await browser.close()
    stop.set()
    await sampler
    lat = np.array([row["seconds"] for row in rows], dtype=float)
    ok = lat[~np.isnan(lat)]
    summary = {
        "sessions": n, "clicks": len(lat), "timeouts": int(np.isnan(lat).sum()),
        "median_s": round(float(np.median(ok)), 3) if ok.size else float("nan"),
        "p95_s": round(float(np.percentile(ok, 95)), 3) if ok.size else float("nan"),
        "max_s": round(float(ok.max()), 3) if ok.size else float("nan"),
        "cold_start_s": round(cold_s, 2), "rss_before_mb": round(base), "cold_rss_mb": round(cold["VmRSS"]),
        "cold_peak_mb": round(cold["VmHWM"]),
        **{f"rss_round{r + 1}_mb": round(v) for r, v in enumerate(after_round)},
        "growth_mb": round(after_round[-1] - after_round[0]) if len(after_round) > 1 else 0,
        "peak_mb": round(max(peak[0], _status_mb(pid)["VmHWM"])),
    }
    return summary, rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---:" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _targets(rows: list[dict]) -> list[str]:
    by_n = {r["sessions"]: r for r in rows}
    out = []
    for n, limit in TARGET_MEDIAN_S.items():
        if n in by_n:
            m = by_n[n]["median_s"]
            out.append(f"- median latency, {n} session(s): {m} s (target <= {limit} s): {'met' if m <= limit else 'MISSED'}")
    if 1 in by_n and 4 in by_n:
        ratio = by_n[4]["cold_peak_mb"] / by_n[1]["cold_peak_mb"]
        out.append(f"- cold-start peak memory, 4 sessions / 1: {ratio:.2f}x (target <= {TARGET_COLD_RATIO}x): "
                   f"{'met' if ratio <= TARGET_COLD_RATIO else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help='"default" (the shipped SmolLM2), "tiny" (smoke test), a folder or id')
    ap.add_argument("--sessions", default="1,2,4", help="comma-separated numbers of concurrent sessions")
    ap.add_argument("--clicks", type=int, default=8, help="heads each session toggles per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for a cold start or one click")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "load.csv"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="headlab-load-"))
    model = save_tiny_llama(work / "tiny-llama", layers=6) if args.model == "tiny" else args.model
    summaries, clicks = [], []
    for n in (int(s) for s in args.sessions.split(",")):
        with streamlit_app(model, work / f"streamlit-{n}.log", startup_s=120) as (url, proc):
            summary, rows = asyncio.run(run_sessions(url, proc.pid, n, args.clicks, args.rounds, args.seed,
                                                     args.timeout))
        summaries.append(summary)
        clicks += rows
        print(f"{n} session(s): median {summary['median_s']} s, p95 {summary['p95_s']} s, "
              f"cold peak {summary['cold_peak_mb']} MB", flush=True)
    print(f"\nmodel {args.model}; {args.clicks} clicks x {args.rounds} rounds per session; server logs in {work}\n")
    print(_markdown(summaries))
    print("\n" + "\n".join(_targets(summaries)))
    out = write_rows(summaries, args.out)
    per_click = write_rows(clicks, out.with_name(out.stem + "_clicks.csv"))
    print(f"\nwrote {out} and {per_click}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
