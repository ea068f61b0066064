"""Every page of the app, driven by streamlit.testing.v1.AppTest on a tiny saved model.

AppTest (Streamlit 1.67) runs app.py, and with it the sidebar, on the first run only; later
runs execute the current page's script. Tests that need the sidebar therefore set session
state before the first run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

import headlab.engine.importance.capture as capture_module
from headlab.engine.core.mask import PruneMask
from headlab.engine.models.load import load_model
from headlab.engine.runtime.evaluate import perplexity
from headlab.engine.runtime.prefix_cache import live_protocol
from headlab.ui import curves, keys
from headlab.ui.models import ModelChoice
from headlab.ui.session import MaskState
from headlab.ui.sidebar import OTHER_MODEL
from tests.app_jobs import run_after_jobs
from tests.tiny import save_tiny

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = ("pages/heads.py", "pages/attention.py", "pages/prune.py")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": save_tiny(root / "tiny-llama", "llama"), "bert": save_tiny(root / "tiny-bert", "bert")}


@pytest.fixture
def tiny_llama(model_dirs, monkeypatch) -> Path:
    """The app opens the tiny GQA Llama (4 heads, 2 KV heads, 2 layers) by default."""
    monkeypatch.setenv("HEADLAB_MODEL", str(model_dirs["llama"]))
    return model_dirs["llama"]


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=180)


def shown_perplexities(at: AppTest) -> tuple[float, float]:
    """(dense, with mask) perplexity as the metrics display them."""
    values = {m.label: float(m.value) for m in at.metric}
    return values["Perplexity, dense"], values["Perplexity, with mask"]


def session_mask(at: AppTest) -> PruneMask:
    return at.session_state[keys.MASK].mask


def toggle_by_form(at: AppTest, layer: int, head: int) -> AppTest:
    at.number_input(key="heads.toggle.layer").set_value(layer)
    at.number_input(key="heads.toggle.head").set_value(head)
    next(b for b in at.button if b.label.startswith("Switch head off")).click()
    return at.run()


def test_app_opens_on_the_heads_page_with_sidebar_and_live_perplexity(tiny_llama):
    at = new_app().run()
    assert not at.exception
    assert at.title[0].value == "Heads"
    assert at.sidebar.selectbox(key=keys.W_MODEL_OPTION).value == str(tiny_llama)
    summary = " ".join(m.value for m in at.sidebar.markdown)
    assert "heads pruned: **0** / 8" in summary and "FLOPs per token removed" in summary
    dense, masked = shown_perplexities(at)
    assert dense == masked and dense > 1


@pytest.mark.parametrize("page", PAGES)
def test_each_page_renders_without_exception_on_a_tiny_model(tiny_llama, page):
    at = new_app().run()
    at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    charts, grids = at.get("plotly_chart"), at.get("bidi_component")
    if page.endswith("heads.py"):
        assert len(grids) == 4 and len(charts) == 1  # a clickable head grid per criterion; their correlation
        assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 8
    elif page.endswith("attention.py"):
        assert len(charts) == 3  # dense and masked side by side, their difference below
    else:
        assert len(grids) == 1 and len(charts) == 1 and len(at.text) == 2  # mask grid, sub-blocks; two generations


def test_toggling_a_head_changes_the_mask_and_the_displayed_perplexity(tiny_llama):
    at = new_app().run()
    dense, before = shown_perplexities(at)
    toggle_by_form(at, 1, 2)
    assert not at.exception
    assert session_mask(at).heads[1, 2] == 0 and int((session_mask(at).heads == 0).sum()) == 1
    _, after = shown_perplexities(at)
    assert after != before
    handle = load_model(str(tiny_llama))
    expected = perplexity(handle, session_mask(at), live_protocol(handle), use_kernels=False).perplexity
    assert after == pytest.approx(expected, abs=1e-3)  # shown with 3 decimals
    toggle_by_form(at, 1, 2)
    assert shown_perplexities(at)[1] == dense and session_mask(at) == PruneMask.dense(handle.geometry)


def test_two_sessions_with_different_masks_get_their_own_perplexities(tiny_llama):
    a, b = new_app().run(), new_app().run()
    toggle_by_form(a, 0, 1)
    b.switch_page("pages/prune.py").run()
    b.slider(key=keys.W_PRUNE_BUDGET).set_value(0.5).run()
    a.run()
    mask_a, mask_b = session_mask(a), session_mask(b)
    assert int((mask_a.heads == 0).sum()) == 1 and int((mask_b.heads_effective() == 0).sum()) == 4
    ppl_a, ppl_b = shown_perplexities(a)[1], shown_perplexities(b)[1]
    assert ppl_a != ppl_b
    handle = load_model(str(tiny_llama))
    protocol = live_protocol(handle)
    assert ppl_a == pytest.approx(perplexity(handle, mask_a, protocol, use_kernels=False).perplexity, abs=1e-3)
    assert ppl_b == pytest.approx(perplexity(handle, mask_b, protocol, use_kernels=False).perplexity, abs=1e-3)


def test_prune_budget_prunes_that_fraction_and_updates_perplexity_and_text(tiny_llama):
    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    dense, _ = shown_perplexities(at)
    at.slider(key=keys.W_PRUNE_BUDGET).set_value(0.25).run()
    assert not at.exception
    mask = session_mask(at)
    assert int((mask.heads == 0).sum()) == 2  # 25% of 8 heads, lowest gradient scores
    assert mask.meta["criterion"] == "gradient"
    assert shown_perplexities(at)[1] != dense
    assert len(at.text) == 2


def test_prune_page_suggest_mask_applies_the_strongest_methods_mask(tiny_llama):
    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    dense, _ = shown_perplexities(at)
    at.slider(key="suggest.budget").set_value(0.25)
    next(b for b in at.button if b.label == "Suggest mask").click()
    at.run()
    run_after_jobs(at)  # the suggestion runs as a job: the page does not wait for it
    assert not at.exception
    mask = session_mask(at)
    assert int((mask.heads == 0).sum()) == 2 and mask.has_bias  # 25% of 8 heads, compensated (fast mode)
    assert {"Dense", "Predicted", "Measured"} <= {m.label for m in at.metric}
    assert shown_perplexities(at)[1] != dense  # the page's live perplexity follows the suggested mask


def test_the_heads_page_and_the_suggest_panel_share_one_capture_pass(tiny_llama, monkeypatch):
    st.cache_resource.clear()  # no capture left over from another test
    real, calls = capture_module.capture, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in list(sys.modules.values()):  # every module that imported the function by name
        if module is not None and vars(module).get("capture") is real:
            monkeypatch.setattr(module, "capture", counting)
    at = new_app().run()
    assert not at.exception and at.title[0].value == "Heads"
    assert len(calls) == 1
    at.switch_page("pages/prune.py").run()
    at.slider(key=keys.W_SUGGEST_BUDGET).set_value(0.25)
    next(b for b in at.button if b.label == "Suggest mask").click()
    at.run()
    run_after_jobs(at)
    assert not at.exception and session_mask(at).has_bias
    assert len(calls) == 1


def test_prune_blocks_unit_removes_sub_blocks(tiny_llama):
    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    at.radio(key=keys.W_PRUNE_UNIT).set_value("blocks").run()
    at.slider(key=keys.W_PRUNE_BUDGET).set_value(0.25).run()
    assert not at.exception
    mask = session_mask(at)
    assert int((mask.attn == 0).sum() + (mask.ffn_block == 0).sum()) == 1  # 25% of 4 sub-blocks
    assert mask.meta["criterion"] == "block_influence"


def test_attention_page_draws_one_head_and_reports_an_empty_prompt(tiny_llama):
    at = new_app().run()
    at.switch_page("pages/attention.py").run()
    at.selectbox(key=keys.W_ATTN_HEAD).set_value(1).run()
    assert not at.exception and len(at.get("plotly_chart")) == 3  # dense, masked, masked minus dense
    at.text_area(key=keys.W_ATTN_PROMPT).input("   ").run()
    assert not at.exception
    assert "prompt is empty" in at.error[0].value


def test_a_bad_model_folder_shows_an_error_and_keeps_the_open_model(tiny_llama, tmp_path):
    at = new_app()
    at.session_state[keys.W_MODEL_OPTION] = OTHER_MODEL
    at.session_state[keys.W_MODEL_PATH] = str(tmp_path / "no-such-model")
    at.run()
    assert not at.exception
    assert "Could not open" in at.sidebar.error[0].value and "no-such-model" in at.sidebar.error[0].value
    assert at.title[0].value == "Heads" and str(tiny_llama) in at.caption[0].value


def test_an_encoder_opened_from_the_sidebar_renders_every_page_with_a_notice(tiny_llama, model_dirs):
    at = new_app()
    at.session_state[keys.W_MODEL_OPTION] = OTHER_MODEL
    at.session_state[keys.W_MODEL_PATH] = str(model_dirs["bert"])
    at.run()
    assert not at.exception and str(model_dirs["bert"]) in at.caption[0].value
    assert "encoder" in at.info[0].value
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.message for e in at.exception])
    assert "encoder" in at.info[0].value  # the Prune page explains why there is no perplexity


def test_sidebar_summary_counts_the_sessions_mask(tiny_llama):
    g = load_model(str(tiny_llama)).geometry
    mask = PruneMask.dense(g).toggle_head(0, 0).toggle_head(1, 3).with_block(1, "ffn", 0.0)
    at = new_app()
    at.session_state[keys.MASK] = MaskState(ModelChoice(str(tiny_llama)).key, mask)
    at.run()
    summary = " ".join(m.value for m in at.sidebar.markdown)
    assert "heads pruned: **2** / 8" in summary
    assert "**0** ATTN, **1** FFN" in summary


def test_perplexity_curves_are_computed_in_the_background_and_drawn(tiny_llama):
    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    next(b for b in at.button if b.label == "Compute the curves").click().run()
    job = curves.curve_job(ModelChoice(str(tiny_llama)).key, "16 wikitext texts x 128 tokens", "heads")
    assert job is not None
    deadline = time.monotonic() + 120
    while not job.finished and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.finished and job.error is None
    at.run()
    assert not at.exception
    curve = next(c for c in at.get("plotly_chart") if "Perplexity vs fraction" in c.proto.spec)
    assert all(len(job.points[c]) == len(curves.CURVE_FRACTIONS) for c in job.criteria)
    assert '"name":"gradient"' in curve.proto.spec.replace(" ", "")
    assert job.points["gradient"][0][1] == pytest.approx(shown_perplexities(at)[0], abs=1e-3)  # 0% = dense


def test_model_weights_are_never_changed_by_the_app(tiny_llama):
    at = new_app().run()
    from headlab.ui.models import _load

    handle = _load(str(tiny_llama), "cpu", "float32", False)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    toggle_by_form(at, 0, 3)
    at.switch_page("pages/prune.py").run()
    at.slider(key=keys.W_PRUNE_BUDGET).set_value(0.5).run()
    at.switch_page("pages/attention.py").run()
    assert all(torch.equal(before[k], v) for k, v in handle.model.state_dict().items())


def test_full_evaluation_that_does_not_fit_the_model_shows_a_clear_error(tiny_llama):
    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    next(b for b in at.button if b.label.startswith("Full evaluation")).click().run()
    assert not at.exception
    assert "exceeds the model's context of 128 tokens" in at.error[0].value


def test_full_evaluation_shows_agreement_with_the_dense_model(tmp_path, monkeypatch):
    from tests.tiny import save_tiny

    monkeypatch.setenv("HEADLAB_MODEL", str(save_tiny(tmp_path / "long", "llama", context=1024)))
    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    next(b for b in at.button if b.label.startswith("Full evaluation")).click().run()
    assert not at.exception and not at.error
    shown = [c.value for c in at.caption if "top-1 agreement" in c.value]
    # The session starts dense: the model agrees with itself at every position and every greedy token.
    assert shown and "top-1 agreement 100.0% (6,132 positions" in shown[0] and "greedy agreement 100.0%" in shown[0]


def test_suggest_panel_by_parameter_budget_applies_a_reconstructed_mask(tiny_llama):
    from headlab.engine.runtime.cost import cost
    from tests.tiny import tiny_handle

    at = new_app().run()
    at.switch_page("pages/prune.py").run()
    at.radio(key="suggest.target").set_value("parameters, by width").run()
    at.slider(key="suggest.params").set_value(0.2)
    at.button(key="suggest.size_button").click()
    at.run()
    assert not at.exception and not at.error
    run_after_jobs(at)
    mask = session_mask(at)
    assert mask.has_refit and mask.meta["suggestion"]["method"] == "obs"
    assert abs(cost(tiny_handle("llama"), mask).params_removed_fraction - 0.2) < 0.03
    assert "Measured" in {m.label for m in at.metric}
