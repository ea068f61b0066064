"""The app in a real browser: Debian's chromium, driven by Playwright, against `streamlit run app.py`.

It opens every page, clicks a head on a head grid and waits for the displayed perplexity to
change, moves the prune budget with the keyboard, checks that no page shows an exception and
that the mask summary stays in the sidebar, clicks a cell of the Dynamic page's token map
(`-k dynamic` runs that test alone), and saves a screenshot of each page under
artifacts/screenshots/. Chromium must be installed (`make setup-browser`): a missing browser
fails this test, it is never skipped.

The same test refreshes the README screenshots on the shipped model:
    HEADLAB_BROWSER_MODEL=default HEADLAB_SCREENSHOT_DIR=docs/screenshots \
        python -m pytest -q -m browser tests/test_browser.py
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from headlab.ui.curves import CURVE_FRACTIONS
from tests.browser import (
    ROOT,
    VIEWPORT,
    click_head,
    grid_shape,
    masked_perplexity,
    plots_drawn,
    plots_settle,
    save_tiny_llama,
    streamlit_app,
)
from tests.browser import open_page as _open_page
from tests.browser import wait_for_change as _wait_for_change
from tests.browser import wait_idle as _wait_idle

SLOW = float(os.environ.get("HEADLAB_BROWSER_TIMEOUT", "240"))  # seconds; the real model scores for a minute
LONG_PROMPT_TOKENS = 4096
LONG_PROMPT = "word " * 4200  # at least 4,096 tokens with a byte-level or a BPE tokenizer

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`streamlit run app.py` on 127.0.0.1 (tiny Llama unless HEADLAB_BROWSER_MODEL says otherwise)."""
    model = os.environ.get("HEADLAB_BROWSER_MODEL") or save_tiny_llama(
        tmp_path_factory.mktemp("models") / "tiny-llama", context=LONG_PROMPT_TOKENS)  # the long-prompt check
    with streamlit_app(model, tmp_path_factory.mktemp("logs") / "streamlit.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def shots() -> Path:
    out = Path(os.environ.get("HEADLAB_SCREENSHOT_DIR", ROOT / "artifacts" / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait_idle(page, timeout: float = SLOW) -> None:
    _wait_idle(page, timeout)


def wait_for_change(page, read, before: str, timeout: float = SLOW) -> str:
    return _wait_for_change(page, read, before, timeout)


def open_page(page, title: str) -> None:
    _open_page(page, title, SLOW)


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

    click_head(page, 0, n_layers // 2, 1)
    after = wait_for_change(page, masked_perplexity, before)
    wait_idle(page)
    assert float(after) != float(before)
    assert "heads pruned: 1" in page.locator('[data-testid="stSidebar"]').inner_text()
    page.screenshot(path=str(shots / "heads-toggled.png"))

    click_head(page, 1, n_layers - 1, 0)  # a second head, on another criterion's map
    wait_for_change(page, masked_perplexity, after)
    wait_idle(page)
    assert "heads pruned: 2" in page.locator('[data-testid="stSidebar"]').inner_text()

    open_page(page, "Attention")
    assert plots_drawn(page, 3, SLOW) == 3  # dense and masked maps of every head, their difference below
    layer = page.locator(".st-key-w-attention-layer input")  # a layer after the first pruned head: a difference
    layer.fill(str(n_layers // 2 + 5))
    layer.press("Enter")
    wait_idle(page)
    assert plots_settle(page, 3, SLOW) == 3
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})  # the difference view included
    wait_idle(page)
    page.screenshot(path=str(shots / "attention.png"))
    page.set_viewport_size(VIEWPORT)
    page.locator(".st-key-w-attention-head").click()  # one head: dense, masked and the difference side by side
    page.get_by_role("option", name="head 1", exact=True).click()
    wait_idle(page)
    assert plots_settle(page, 3, SLOW) == 3
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1800})  # the difference below the two maps
    wait_idle(page)
    page.screenshot(path=str(shots / "attention-head.png"))
    page.set_viewport_size(VIEWPORT)

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


def dynamic_cell(page) -> tuple[str, str]:
    """The (token, layer) the Dynamic page inspects, as its two inputs show them."""
    return (page.locator(".st-key-w-dynamic-token input").input_value(),
            page.locator(".st-key-w-dynamic-layer input").input_value())


def test_the_dynamic_page_maps_tokens_and_a_clicked_cell_is_inspected(app_url, browser, shots):
    page = browser.new_page(viewport={"width": VIEWPORT["width"], "height": 2000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Perplexity, with mask").first.wait_for(timeout=SLOW * 1000)
    wait_idle(page)
    open_page(page, "Dynamic")
    page.get_by_text("Oracle recall", exact=True).first.wait_for(timeout=SLOW * 1000)
    wait_idle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    token_map = page.locator(".js-plotly-plot").first
    assert "kept per token" in token_map.inner_text()
    before = dynamic_cell(page)
    area = token_map.locator(".nsewdrag").first.bounding_box()
    page.mouse.click(area["x"] + area["width"] * 0.75, area["y"] + area["height"] * 0.4)  # a cell away from (0, 0)
    wait_for_change(page, dynamic_cell, before)
    wait_idle(page)
    after = dynamic_cell(page)  # read once the rerun is over: the two inputs may be redrawn one after the other
    assert after != ("0", "0")
    page.get_by_text(re.compile(rf"^Token {after[0]} .*, layer {after[1]}:")).first.wait_for(timeout=SLOW * 1000)
    page.get_by_role("button", name="Generate, dense and dynamic").click()
    page.get_by_text("new tokens agree").first.wait_for(timeout=SLOW * 1000)
    wait_idle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.get_by_role("heading", name="Dynamic").first.scroll_into_view_if_needed()  # the page from its top
    page.screenshot(path=str(shots / "dynamic.png"))
    assert not errors, errors
    page.close()


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
    assert plots_settle(page, 3, SLOW) == 3  # dense and masked maps of the whole prompt, their difference (a
    # rerun under load keeps the short prompt's three until it replaces them)
    page.screenshot(path=str(shots / "attention-4096-tokens.png"))
    assert not errors, errors
    page.close()
