"""The app in a real browser: Debian's chromium, driven by Playwright, against `streamlit run app.py`.

It opens every page, clicks a head on a heatmap and waits for the displayed perplexity to
change, moves the prune budget with the keyboard, checks that no page shows an exception and
that the mask summary stays in the sidebar, and saves a screenshot of each page under
artifacts/screenshots/. Chromium must be installed (`make setup-browser`): a missing browser
fails this test, it is never skipped.

The same test refreshes the README screenshots on the shipped model:
    HEADLAB_BROWSER_MODEL=default HEADLAB_SCREENSHOT_DIR=docs/screenshots \
        python -m pytest -q -m browser tests/test_browser.py
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.tiny import tiny_handle
from ui.curves import CURVE_FRACTIONS

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1250}
SLOW = float(os.environ.get("HEADLAB_BROWSER_TIMEOUT", "240"))  # seconds; the real model scores for a minute
LONG_PROMPT_TOKENS = 4096
LONG_PROMPT = "word " * 4200  # at least 4,096 tokens with a byte-level or a BPE tokenizer

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`streamlit run app.py` on 127.0.0.1 (tiny Llama unless HEADLAB_BROWSER_MODEL says otherwise)."""
    model = os.environ.get("HEADLAB_BROWSER_MODEL")
    if not model:
        path = tmp_path_factory.mktemp("models") / "tiny-llama"
        h = tiny_handle("llama")
        h.model.config.max_position_embeddings = LONG_PROMPT_TOKENS  # rotary positions: the long-prompt check
        h.model.save_pretrained(path, safe_serialization=True)
        h.tokenizer.save_pretrained(path)
        model = str(path)
    env = {**os.environ}
    if model != "default":
        env["HEADLAB_MODEL"] = model
    port = _free_port()
    log = open(tmp_path_factory.mktemp("logs") / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start (see {log.name})") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    out = Path(os.environ.get("HEADLAB_SCREENSHOT_DIR", ROOT / "artifacts" / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install it with `make setup-browser` (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def wait_idle(page, timeout: float = SLOW) -> None:
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


def wait_for_change(page, read, before: str, timeout: float = SLOW) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = read(page)
        except Exception:  # the element is being re-drawn
            now = before
        if now != before:
            return now
        time.sleep(0.25)
    raise AssertionError(f"the value stayed {before!r}")


def click_head(page, chart_index: int, layer: int, head: int, n_layers: int, n_heads: int) -> None:
    """Click the centre of cell (layer, head) of the chart's plot area (layer 0 at the top)."""
    chart = page.locator(".js-plotly-plot").nth(chart_index)
    chart.scroll_into_view_if_needed()
    box = chart.locator(".nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * (head + 0.5) / n_heads,
                     box["y"] + box["height"] * (layer + 0.5) / n_layers)


def grid_shape(page) -> tuple[int, int]:
    """(layers, heads) read from the Heads page caption ("... : 2 layers x 4 heads ...")."""
    import re

    text = page.get_by_text(re.compile(r"\d+ layers x \d+ heads")).first.inner_text()
    layers, heads = re.search(r"(\d+) layers x (\d+) heads", text).groups()
    return int(layers), int(heads)


def curve_points(page) -> int:
    """Points on the shortest criterion line of the perplexity-curve chart, from Plotly's data (0 if none)."""
    return page.evaluate("""() => {
        for (const el of document.querySelectorAll('.js-plotly-plot')) {
            const title = el.layout && el.layout.title && el.layout.title.text;
            if (title && title.includes('Perplexity vs fraction') && el.data.length)
                return Math.min(...el.data.filter(t => !(t.name || '').startsWith('dense'))
                                          .map(t => (t.x || []).length));
        }
        return 0;
    }""")


def open_page(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=SLOW * 1000)
    wait_idle(page)


def test_each_page_opens_in_chromium_and_a_clicked_head_changes_the_perplexity(app_url, browser, shots):
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Perplexity, with mask").first.wait_for(timeout=SLOW * 1000)
    wait_idle(page)
    page.screenshot(path=str(shots / "heads.png"))
    n_layers, n_heads = grid_shape(page)
    before = masked_perplexity(page)

    click_head(page, 0, n_layers // 2, 1, n_layers, n_heads)
    after = wait_for_change(page, masked_perplexity, before)
    wait_idle(page)
    assert float(after) != float(before)
    assert "heads pruned: 1" in page.locator('[data-testid="stSidebar"]').inner_text()
    page.screenshot(path=str(shots / "heads-toggled.png"))

    click_head(page, 1, n_layers - 1, 0, n_layers, n_heads)  # a second head, on another criterion's map
    wait_for_change(page, masked_perplexity, after)
    wait_idle(page)
    assert "heads pruned: 2" in page.locator('[data-testid="stSidebar"]').inner_text()

    open_page(page, "Attention")
    assert page.locator(".js-plotly-plot").count() == 2  # dense and masked maps
    page.screenshot(path=str(shots / "attention.png"))

    open_page(page, "Prune")
    before = masked_perplexity(page)
    budget = page.locator('.st-key-w-prune-budget input[type="range"]')
    for _ in range(8):  # to 0.20 of the heads (default criterion); a key press during a rerun can be dropped
        if budget.get_attribute("aria-valuetext") == "0.20":
            break
        budget.focus()
        budget.press("ArrowRight")
        wait_idle(page)
    assert budget.get_attribute("aria-valuetext") == "0.20"
    wait_for_change(page, masked_perplexity, before)
    wait_idle(page)
    page.get_by_role("button", name="Compute the curves").click()
    page.get_by_text("Perplexity vs fraction of heads pruned").last.wait_for(timeout=SLOW * 1000)
    deadline = time.monotonic() + SLOW * 3
    while curve_points(page) < len(CURVE_FRACTIONS) and time.monotonic() < deadline:
        time.sleep(1)
    assert curve_points(page) == len(CURVE_FRACTIONS), "the perplexity curves did not finish"
    wait_idle(page)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1800})  # the whole page, curves included
    wait_idle(page)
    page.screenshot(path=str(shots / "prune.png"))
    page.set_viewport_size(VIEWPORT)

    for title in ("Diagnostics", "Clusters", "Export", "Distill"):
        open_page(page, title)
        assert page.locator('[data-testid="stException"]').count() == 0, page.locator('[data-testid="stException"]').first.inner_text()
        assert "heads pruned: " in page.locator('[data-testid="stSidebar"]').inner_text()  # the mask summary on every page
        page.screenshot(path=str(shots / f"{title.lower()}.png"))
    assert not errors, errors


def test_the_attention_page_draws_the_map_of_a_4096_token_prompt(app_url, browser, shots):
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Perplexity, with mask").first.wait_for(timeout=SLOW * 1000)
    wait_idle(page)
    open_page(page, "Attention")
    box = page.locator(".st-key-w-attention-prompt textarea")
    box.fill(LONG_PROMPT)
    box.press("Control+Enter")  # a text area applies its value on Ctrl+Enter (or on blur)
    caption = page.get_by_text(re.compile(r"^\d{4,} tokens")).first
    caption.wait_for(timeout=SLOW * 1000)
    wait_idle(page)
    n_tokens = int(re.match(r"(\d+) tokens", caption.inner_text()).group(1))
    assert n_tokens >= LONG_PROMPT_TOKENS, caption.inner_text()
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.locator(".js-plotly-plot").count() == 2  # dense and masked maps of the whole prompt
    page.screenshot(path=str(shots / "attention-4096-tokens.png"))
    assert not errors, errors
    page.close()
