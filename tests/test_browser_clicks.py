"""Fast clicks in a real browser: every click on a head grid toggles exactly its head, once.

Chromium (Playwright) against `streamlit run app.py` on 127.0.0.1, a tiny random Llama of 6
layers x 4 heads. Clicks go to precomputed cell centres with no pause between them, so they
land while the app is still re-running for the earlier ones. Also checked: the grids do not
move when the first toggle brings in the perplexity delta, and every request the page makes
goes to 127.0.0.1.

A reload is a new browser session (the mask lives in the session, as every other setting):
the mask starts dense again, and the clicks made after the reload are exact too. To keep a
mask across a reload, save it (sidebar "Save mask") and load it back.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from headlab.engine.core.mask import PruneMask
from tests.browser import (
    VIEWPORT,
    grid_cell,
    grid_shape,
    is_local_url,
    masked_perplexity,
    save_tiny_llama,
    sidebar_heads_pruned,
    streamlit_app,
    wait_idle,
)

SLOW = float(os.environ.get("HEADLAB_BROWSER_TIMEOUT", "240"))
LAYERS = 6

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    model = save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-6", layers=LAYERS)
    with streamlit_app(model, tmp_path_factory.mktemp("logs") / "streamlit.log") as (url, _):
        yield url


def open_heads_page(page, url: str | None = None) -> None:
    if url is not None:
        page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("Perplexity, with mask").first.wait_for(timeout=SLOW * 1000)
    grid_cell(page, 0, 0, 0).wait_for(timeout=SLOW * 1000)
    wait_idle(page, SLOW)


def click_fast(page, clicks: list[tuple[int, int, int]]) -> None:
    """Click (grid, layer, head) cells at their centres as measured now, with no pause in between."""
    points = []
    for grid, layer, head in clicks:
        box = grid_cell(page, grid, layer, head).bounding_box()
        points.append((box["x"] + box["width"] / 2, box["y"] + box["height"] / 2))
    for x, y in points:
        page.mouse.click(x, y)


def expected_pruned(clicks: list[tuple[int, int, int]], start: set[tuple[int, int]]) -> set[tuple[int, int]]:
    out = set(start)
    for _, layer, head in clicks:
        out ^= {(layer, head)}
    return out


def settled_mask(page, tmp_path, want: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The session's pruned heads (the sidebar's "Save mask" file) once they are `want`, or as they are after
    SLOW seconds. On a starved machine a click reaches the server seconds after it was made, so the app can
    look idle, and even show the right count, before it has seen the last click: only the exact set, or a
    timeout, ends the wait. A click lost or applied twice never gives the set, and the caller's assertion fails."""
    deadline = time.monotonic() + SLOW
    while True:
        wait_idle(page, SLOW)
        got = saved_mask_pruned(page, tmp_path)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(1.0)


def saved_mask_pruned(page, tmp_path) -> set[tuple[int, int]]:
    """The pruned heads of the mask file the sidebar's "Save mask" button downloads.

    A run that starts while the file downloads (a late rerun of the page) replaces the button's file and
    cancels the download: then the button, redrawn, is clicked again.
    """
    path = tmp_path / f"mask-{time.monotonic_ns()}.json"
    for attempt in range(3):
        with page.expect_download() as download:
            page.locator('[data-testid="stSidebar"]').get_by_text("Save mask").click()
        try:
            download.value.save_as(path)
            break
        except Exception as e:  # playwright's Error: "Download.save_as: canceled"
            if "canceled" not in str(e) or attempt == 2:
                raise
            wait_idle(page, SLOW)
    mask = PruneMask.from_dict(json.loads(path.read_text()))
    return {(int(l), int(h)) for l, h in (mask.heads_effective() == 0).nonzero().tolist()}


def crossed_cells(page, grid: int) -> set[tuple[int, int]]:
    """Cells a head grid shows as pruned."""
    cells = page.locator('[data-testid="stBidiComponentIsolated"]').nth(grid).locator(".cell.pruned")
    return {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-head"))) for c in cells.all()}


def shown_on(page, grids: list[int], want: set[tuple[int, int]], timeout: float = 20.0) -> dict[int, set]:
    """What each grid shows as pruned, once all show `want` or `timeout` seconds passed (a grid redraws a run late)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = {g: crossed_cells(page, g) for g in grids}
        if all(v == want for v in shown.values()) or time.monotonic() > deadline:
            return shown
        time.sleep(0.25)


def test_clicks_with_no_pause_prune_exactly_the_clicked_heads_before_and_after_a_reload(app_url, browser, tmp_path):
    page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    open_heads_page(page, app_url)
    assert grid_shape(page) == (LAYERS, 4)
    dense = masked_perplexity(page)
    top = grid_cell(page, 0, 0, 0).bounding_box()["y"]

    # Ten different heads, most on the first criterion's grid, two on the third one.
    first = [(0, 0, 1), (0, 1, 2), (0, 2, 0), (0, 3, 3), (0, 4, 1), (2, 5, 2), (0, 0, 3), (0, 2, 2), (2, 1, 0),
             (0, 5, 3)]
    click_fast(page, first)
    want = expected_pruned(first, set())
    assert len(want) == 10
    assert settled_mask(page, tmp_path, want) == want
    assert sidebar_heads_pruned(page) == len(want)
    assert shown_on(page, [0, 3], want) == {0: want, 3: want}  # every grid shows the same mask
    assert masked_perplexity(page) != dense
    assert grid_cell(page, 0, 0, 0).bounding_box()["y"] == top  # the delta line did not push the grids down

    page.reload(wait_until="domcontentloaded")  # a new session: the mask starts dense
    open_heads_page(page)
    assert sidebar_heads_pruned(page) == 0 and masked_perplexity(page) == dense
    # Eight clicks, one head twice (on and off again) and one on two grids: parity decides.
    second = [(1, 0, 0), (1, 1, 1), (1, 0, 0), (0, 3, 2), (1, 4, 0), (3, 4, 0), (1, 5, 1), (1, 2, 3)]
    click_fast(page, second)
    want = expected_pruned(second, set())
    assert want == {(1, 1), (3, 2), (5, 1), (2, 3)}
    assert settled_mask(page, tmp_path, want) == want
    assert sidebar_heads_pruned(page) == len(want)
    assert shown_on(page, [1], want) == {1: want}

    assert not errors, errors
    outside = sorted({u for u in requests if not is_local_url(u)})
    assert requests and not outside, outside  # no CDN fonts, icons or anything else from outside
    page.close()
