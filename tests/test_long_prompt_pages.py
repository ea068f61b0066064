"""The Attention and Diagnostics pages on long prompts (AppTest, a tiny Llama whose context is 1,024 tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from headlab.engine.importance.diagnostics import HEAD_KINDS
from headlab.ui import keys
from tests.tiny import save_tiny

APP = str(Path(__file__).resolve().parent.parent / "app.py")
CONTEXT = 1024


@pytest.fixture(scope="module")
def long_context_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama-1k"
    save_tiny(path, "llama", context=CONTEXT)
    return path


@pytest.fixture
def app(long_context_llama, monkeypatch) -> AppTest:
    monkeypatch.setenv("HEADLAB_MODEL", str(long_context_llama))
    return AppTest.from_file(APP, default_timeout=180).run()


def test_the_attention_page_maps_a_prompt_of_the_whole_context_and_switches_layers_from_its_cache(app):
    at = app.switch_page("pages/attention.py").run()
    at.text_area(key=keys.W_ATTN_PROMPT).input("word " * 300).run()  # 1,500 byte tokens, cut to the context
    assert not at.exception, [e.message for e in at.exception]
    assert len(at.get("plotly_chart")) == 3  # dense, masked, their difference
    assert f"{CONTEXT} tokens (the prompt was cut to the first {CONTEXT:,})" in at.caption[0].value
    cache = at.session_state[keys.ATTN_LAYER_INPUTS]
    # the default prompt and this one; dense and "masked" (a mask that keeps everything) share one forward
    assert len(cache) == 2
    at.number_input(key=keys.W_ATTN_LAYER).set_value(0).run()
    assert not at.exception and len(at.get("plotly_chart")) == 3 and len(cache) == 2


def test_the_diagnostics_page_labels_every_head_on_a_long_prompt(app):
    at = app.switch_page("pages/diagnostics.py").run()
    at.text_area(key="w.diagnostics.prompt").input("the cat sat on the mat. " * 40)
    next(b for b in at.button if b.label == "Label the heads on this prompt").click().run()
    assert not at.exception, [e.message for e in at.exception]
    table = at.dataframe[-1].value
    assert len(table) == 8 and set(table["kind"]) <= set(HEAD_KINDS)
    assert {"sink", "prev_mass", "local_mass", "mean_distance", "entropy_normalized"} <= set(table.columns)
    assert any("960 tokens" in m.value for m in at.markdown)
