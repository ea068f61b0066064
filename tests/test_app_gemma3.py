"""Every page of the app on a tiny saved Gemma 3 (sliding and global layers), driven by AppTest; the model picker."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from headlab.engine.models.load import GEMMA3_MODEL
from headlab.ui import keys
from headlab.ui.pages import available_pages
from tests.tiny import save_tiny

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-gemma3", "gemma3")


@pytest.fixture
def tiny_gemma(gemma_dir, monkeypatch) -> Path:
    monkeypatch.setenv("HEADLAB_MODEL", str(gemma_dir))
    return gemma_dir


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_the_model_picker_offers_the_shipped_gemma(tiny_gemma):
    at = _ok(AppTest.from_file(APP, default_timeout=180).run())
    assert GEMMA3_MODEL in at.sidebar.selectbox(key=keys.W_MODEL_OPTION).options


@pytest.mark.parametrize("page", [p.path for p in available_pages()])
def test_every_page_renders_on_a_tiny_gemma3(tiny_gemma, page):
    at = _ok(AppTest.from_file(APP, default_timeout=180).run())
    _ok(at.switch_page(page).run())
    assert at.title, f"{page} drew no title"


def test_toggling_a_head_changes_the_displayed_perplexity_of_gemma(tiny_gemma):
    at = _ok(AppTest.from_file(APP, default_timeout=180).run())
    values = {m.label: float(m.value) for m in at.metric}
    assert values["Perplexity, dense"] == values["Perplexity, with mask"]
    at.number_input(key="heads.toggle.layer").set_value(0)  # the sliding-window layer
    at.number_input(key="heads.toggle.head").set_value(1)
    next(b for b in at.button if b.label.startswith("Switch head off")).click()
    _ok(at.run())
    values = {m.label: float(m.value) for m in at.metric}
    assert values["Perplexity, with mask"] != values["Perplexity, dense"]
    assert float(at.session_state[keys.MASK].mask.heads[0, 1]) == 0.0


def test_prune_then_export_then_dynamic_generation_on_gemma(tiny_gemma, tmp_path, monkeypatch):
    from headlab.ui import dynamic

    monkeypatch.setattr(dynamic, "BENCH_QUALITY", tmp_path / "dynamic.csv")  # no benchmark figures to read
    monkeypatch.setattr(dynamic, "BENCH_DECODE", tmp_path / "dynamic_decode.csv")
    at = _ok(AppTest.from_file(APP, default_timeout=180).run())
    _ok(at.switch_page("pages/prune.py").run())
    _ok(at.slider(key=keys.W_PRUNE_BUDGET).set_value(0.25).run())
    assert int((at.session_state[keys.MASK].mask.heads == 0).sum()) == 2  # 25% of 8 heads
    _ok(at.switch_page("pages/export.py").run())
    at.text_input(key="w.export.folder").set_value(str(tmp_path / "out"))
    at.checkbox(key="w.export.evaluate").set_value(False)
    next(b for b in at.button if b.label == "Export").click()
    _ok(at.run())
    assert (tmp_path / "out" / "config.json").exists()
    _ok(at.switch_page("pages/dynamic.py").run())
    at.number_input(key=keys.W_DYN_NEW_TOKENS).set_value(8)
    next(b for b in at.button if b.label == "Generate, dense and dynamic").click()
    _ok(at.run())
    assert len(at.text) == 2  # the dense and the dynamic continuation
