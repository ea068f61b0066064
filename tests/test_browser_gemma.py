"""Gemma 3 in a real browser: the app on a tiny random Gemma 3 (a sliding-window and a global layer).

Every page opens without an exception, a clicked head on the sliding-window layer changes the
displayed perplexity, and the sidebar counts it. Chromium must be installed (`make setup-browser`).
"""

from __future__ import annotations

import pytest

from tests.browser import (
    VIEWPORT,
    click_head,
    grid_shape,
    masked_perplexity,
    open_page,
    streamlit_app,
    wait_for_change,
    wait_idle,
)
from tests.tiny import save_tiny

pytestmark = pytest.mark.browser
SLOW = 240.0


def test_every_page_works_on_a_tiny_gemma3_in_chromium(tmp_path, browser):
    model = save_tiny(tmp_path / "tiny-gemma3", "gemma3", context=1024)
    with streamlit_app(str(model), tmp_path / "streamlit.log") as (url, _):
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text("Perplexity, with mask").first.wait_for(timeout=SLOW * 1000)
        wait_idle(page, SLOW)
        n_layers, n_heads = grid_shape(page)
        assert (n_layers, n_heads) == (2, 4)
        before = masked_perplexity(page)
        click_head(page, 0, 0, 1)  # layer 0 is the sliding-window layer
        after = wait_for_change(page, masked_perplexity, before, SLOW)
        wait_idle(page, SLOW)
        assert float(after) != float(before)
        assert "heads pruned: 1" in page.locator('[data-testid="stSidebar"]').inner_text()
        for title in ("Attention", "Prune", "Diagnostics", "Clusters", "Export", "Distill", "Dynamic"):
            open_page(page, title, SLOW)
            exceptions = page.locator('[data-testid="stException"]')
            assert exceptions.count() == 0, exceptions.first.inner_text()
            assert "heads pruned: 1" in page.locator('[data-testid="stSidebar"]').inner_text()
        assert not errors, errors
