"""Driving the app in a real browser: `streamlit run app.py` on 127.0.0.1 and Debian's chromium via Playwright.

Used by the browser tests and bench/bench_load.py. Playwright's own browser download is not
reachable here, so chromium is /usr/bin/chromium (`make setup-browser`).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from transformers import LlamaForCausalLM

from tests.tiny import save_tiny, tiny_model

__all__ = ["ROOT", "CHROMIUM", "CHROMIUM_ARGS", "VIEWPORT", "save_tiny_llama", "streamlit_app", "launch_chromium",
           "wait_idle", "masked_perplexity", "wait_for_change", "grid_shape", "grid_cell", "click_head",
           "sidebar_heads_pruned", "open_page", "is_local_url", "plots_drawn", "plots_settle", "failure_context"]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1250}
SERVER_LOGS: list[Path] = []  # every streamlit log of this test process, newest last (failure_context reads them)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_free_port = free_port


def connects(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port succeeds within a second."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def save_tiny_llama(folder: Path, context: int | None = None, layers: int | None = None) -> str:
    """A tiny random Llama (4 heads, 2 KV heads; 2 layers and 128 positions unless told) saved as safetensors."""
    model = tiny_model("llama")
    if layers is not None:  # the same config with more layers, freshly initialised
        config = model.config
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    return str(save_tiny(folder, model=model, context=context))


@contextmanager
def streamlit_app(model: str, log_path: Path, *, startup_s: float = 60,
                  env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of `streamlit run app.py` on a free 127.0.0.1 port; `model` = a folder, an id or "default";
    `env`: variables set for the server on top of this process's."""
    env = {**os.environ, **(env or {})}
    if model != "default":
        env["HEADLAB_MODEL"] = model
    port = _free_port()
    log = open(log_path, "w")
    SERVER_LOGS.append(Path(log_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start (see {log_path})") from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def launch_chromium(playwright):
    """Debian's chromium through Playwright (fails clearly when it is not installed)."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install it with `make setup-browser` (apt-get install chromium)"
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def wait_idle(page, timeout: float) -> None:
    """Wait until the script has stopped running (no status widget for a second)."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        now = time.monotonic()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since > 1.0:
            return
        time.sleep(0.2)
    raise AssertionError("the app kept running past the timeout")


def masked_perplexity(page) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Perplexity, with mask").first
    return metric.locator('[data-testid="stMetricValue"]').inner_text()


def wait_for_change(page, read: Callable, before: str, timeout: float, poll_s: float = 0.25) -> str:
    """Poll `read(page)` until it differs from `before`; the new value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = read(page)
        except Exception:  # the element is being re-drawn
            now = before
        if now != before:
            return now
        time.sleep(poll_s)
    raise AssertionError(f"the value stayed {before!r}")


def grid_shape(page) -> tuple[int, int]:
    """(layers, heads) read from the Heads page caption ("... : 2 layers x 4 heads ...")."""
    text = page.get_by_text(re.compile(r"\d+ layers x \d+ heads")).first.inner_text()
    layers, heads = re.search(r"(\d+) layers x (\d+) heads", text).groups()
    return int(layers), int(heads)


def grid_cell(page, grid_index: int, layer: int, head: int):
    """The locator of cell (layer, head) of the page's `grid_index`-th head grid (headlab/ui/head_grid.py)."""
    grid = page.locator('[data-testid="stBidiComponentIsolated"]').nth(grid_index)
    return grid.locator(f'.cell[data-layer="{layer}"][data-head="{head}"]')


def click_head(page, grid_index: int, layer: int, head: int) -> None:
    """Click cell (layer, head) of a head grid."""
    cell = grid_cell(page, grid_index, layer, head)
    cell.scroll_into_view_if_needed()
    cell.click()


def sidebar_heads_pruned(page) -> int:
    """The "heads pruned: N" count of the sidebar's mask summary."""
    text = page.locator('[data-testid="stSidebar"]').inner_text()
    return int(re.search(r"heads pruned: (\d+)", text).group(1))


def plots_drawn(page, expected: int, timeout: float) -> int:
    """Plotly charts drawn once `expected` are (Plotly draws in the browser after the script has finished,
    later under load), or when `timeout` runs out: the count, for the caller to assert on."""
    try:
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {expected}",
                               timeout=timeout * 1000)
    except PlaywrightTimeout:  # the assertion that follows reports the count
        pass
    return page.locator(".js-plotly-plot").count()


def plots_settle(page, expected: int, timeout: float) -> int:
    """The Plotly chart count once it is exactly `expected` (a rerun keeps the old charts until it replaces them),
    or whatever it is when `timeout` runs out: the count, for the caller to assert on."""
    try:
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {expected}",
                               timeout=timeout * 1000)
    except PlaywrightTimeout:
        pass
    return page.locator(".js-plotly-plot").count()


def open_page(page, title: str, timeout: float) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=timeout * 1000)
    wait_idle(page, timeout)


def is_local_url(url: str) -> bool:
    """Whether a request goes to this machine (127.0.0.1 / localhost) or stays inside the page (data:, blob:)."""
    if url.startswith(("data:", "blob:", "about:")):
        return True
    host = re.match(r"^[a-z]+://([^/:]+|\[[^\]]+\])", url)
    return host is not None and host.group(1) in ("127.0.0.1", "localhost", "[::1]")


def failure_context(browser, shots: Path, log_lines: int = 60, text_chars: int = 4000) -> str:
    """What a failed browser test leaves for its report: each open page's address, visible text, screenshot (saved
    under `shots`) and the browser's recent errors and console warnings, and the tail of the newest server log."""
    parts = []
    for i, page in enumerate(p for context in browser.contexts for p in context.pages):
        try:
            shot = shots / f"page-{i}.png"
            page.screenshot(path=str(shot), full_page=True)
            text = page.locator("body").inner_text(timeout=5000)
            errors = [str(e) for e in page.page_errors()] + [
                f"console {m.type}: {m.text}" for m in page.console_messages() if m.type in ("error", "warning")]
            parts.append(f"--- page {i}: {page.url} (screenshot {shot})\n{text[:text_chars]}\n"
                         f"--- page {i}: errors and warnings in the browser\n" + "\n".join(errors[-20:]))
        except (PlaywrightError, OSError) as e:  # a page that is closing or hung: say so and go on
            parts.append(f"--- page {i}: {page.url}: could not be read ({e})")
    if SERVER_LOGS and SERVER_LOGS[-1].exists():
        tail = SERVER_LOGS[-1].read_text(errors="replace").splitlines()[-log_lines:]
        parts.append(f"--- server log {SERVER_LOGS[-1]} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)
