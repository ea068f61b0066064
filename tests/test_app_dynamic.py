"""The Dynamic page, driven by streamlit.testing.v1.AppTest on a tiny saved Llama, and its benchmark reader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from headlab.engine.dynamic import save_thresholds
from headlab.engine.dynamic.methods import calibrated, method_perplexity
from headlab.engine.models.load import load_model
from headlab.engine.runtime.prefix_cache import live_protocol
from headlab.ui import dynamic, keys
from headlab.ui.models import ModelChoice
from headlab.ui.sidebar import OTHER_MODEL
from tests.tiny import save_tiny, tiny_model

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGE = "pages/dynamic.py"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": save_tiny(root / "tiny-llama"), "other": save_tiny(root / "other", model=tiny_model("llama", 1)),
            "bert": save_tiny(root / "tiny-bert", "bert")}


@pytest.fixture
def tiny_llama(model_dirs, monkeypatch) -> Path:
    monkeypatch.setenv("HEADLAB_MODEL", str(model_dirs["llama"]))
    return model_dirs["llama"]


@pytest.fixture
def no_bench(monkeypatch, tmp_path):
    """The page reads benchmark files from a folder where there are none."""
    monkeypatch.setattr(dynamic, "BENCH_QUALITY", tmp_path / "dynamic.csv")
    monkeypatch.setattr(dynamic, "BENCH_DECODE", tmp_path / "dynamic_decode.csv")
    monkeypatch.setattr(dynamic, "BENCH_LAYERS", tmp_path / "dynamic_layers.csv")
    return tmp_path


def dynamic_page(at: AppTest | None = None) -> AppTest:
    at = at or AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page(PAGE).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def charts(at: AppTest) -> list[str]:
    return [c.proto.spec for c in at.get("plotly_chart")]


def test_the_page_shows_cats_perplexity_sparsity_token_map_and_cell_detail(tiny_llama, no_bench):
    at = dynamic_page()
    assert at.title[0].value == "Dynamic" and not at.error
    m = metrics(at)
    handle = load_model(str(tiny_llama))
    protocol = live_protocol(handle)
    method = calibrated(handle, "cats", 0.5, dynamic.calibration_windows(handle))
    expected = method_perplexity(handle, method, protocol)
    assert float(m["Perplexity, cats 50%"]) == pytest.approx(expected.result.perplexity, abs=1e-3)
    assert m["FFN channels dropped (measured)"] == f"{expected.sparsity.ffn:.1%}"
    specs = charts(at)
    assert len(specs) == 3  # the token map, the cell's scores vs the oracle, its channels
    assert "FFN channels kept per token" in specs[0] and "cats score vs the oracle" in specs[1]
    assert "Units fired" in specs[2]
    assert any("dynamic.csv" in i.value and "bench_dynamic.py" in i.value for i in at.info)  # no misleading chart


def test_choosing_a_cell_shows_that_tokens_channels(tiny_llama, no_bench):
    at = dynamic_page()
    at.number_input(key=keys.W_DYN_TOKEN).set_value(5)
    at.number_input(key=keys.W_DYN_LAYER).set_value(1).run()
    assert not at.exception
    assert "Token 5" in charts(at)[1] and "layer 1" in charts(at)[1]
    kept = int(metrics(at)["FFN channels kept"].split(" / ")[0])
    assert 0 < kept < 128


@pytest.mark.parametrize("method", ["oracle", "teal", "wina", "ipn"])
def test_every_training_free_method_renders(tiny_llama, no_bench, method):
    at = dynamic_page()
    at.selectbox(key=keys.W_DYN_METHOD).set_value(method)
    at.slider(key=keys.W_DYN_TARGET).set_value(0.3).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    label = next(k for k in metrics(at) if k.startswith("Perplexity, ") and k != "Perplexity, dense")
    assert label == f"Perplexity, {method} 30%"
    dropped = float(metrics(at)["FFN channels dropped (measured)"].rstrip("%")) / 100
    assert 0.1 < dropped < 0.5


def test_dense_and_dynamic_generation_side_by_side(tiny_llama, no_bench):
    at = dynamic_page()
    at.number_input(key=keys.W_DYN_NEW_TOKENS).set_value(8)
    next(b for b in at.button if b.label == "Generate, dense and dynamic").click().run()
    assert not at.exception and not at.error
    m = metrics(at)
    assert m["Dense"].endswith("tokens/s") and m["cats 50%"].endswith("tokens/s")
    assert len(at.text) == 2
    assert any("kept weights" in c.value and "ideal speed-up" in c.value for c in at.caption)


def test_an_importance_network_decodes_at_4_bits_beside_the_dense_int4_model(tiny_llama, no_bench):
    at = dynamic_page()
    assert at.radio(key=keys.W_DYN_PRECISION).disabled  # CATS (the default) decides from the float gate
    at.selectbox(key=keys.W_DYN_METHOD).set_value("ipn").run()
    assert not at.radio(key=keys.W_DYN_PRECISION).disabled
    at.radio(key=keys.W_DYN_PRECISION).set_value("int4")
    at.number_input(key=keys.W_DYN_NEW_TOKENS).set_value(8)
    next(b for b in at.button if b.label == "Generate, dense and dynamic").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert metrics(at)["Dense"].endswith("tokens/s") and len(at.text) == 2
    assert any("kept weights" in c.value and "at 4 bits" in c.value for c in at.caption)


def test_training_runs_in_the_background_and_its_network_can_be_inspected(tiny_llama, no_bench, tmp_path):
    at = dynamic_page()
    at.number_input(key=keys.W_DYN_STEPS).set_value(2)
    at.checkbox(key=keys.W_DYN_HEADS).check()
    next(b for b in at.button if b.label == "Train the IPN").click().run()
    assert not at.exception
    run = at.session_state[keys.DYN_TRAINING]
    at.run()  # a rerun while it trains does not stop it
    deadline = time.monotonic() + 120
    while not run.job.finished and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.job.finished and run.job.error is None and run.result is not None
    assert [h["step"] for h in run.history] == [1, 2]
    at.run()
    assert any("Trained in" in s.value for s in at.success)
    assert any('"text":"Training"' in spec.replace(" ", "") for spec in charts(at))
    at.selectbox(key=keys.W_DYN_METHOD).set_value(dynamic.TRAINED).run()
    assert not at.exception and not at.error
    assert "Perplexity, IPN trained here, 50%" in metrics(at)
    assert run.result.ipn.heads and "Query heads kept" in metrics(at)
    assert any("Query heads kept per token" in spec for spec in charts(at))  # a second map, for the heads
    at.text_input(key=keys.W_DYN_SAVE_FOLDER).input(str(tmp_path / "ipn")).run()
    next(b for b in at.button if b.label == "Save").click().run()
    assert (tmp_path / "ipn" / "ipn.safetensors").exists()


def test_a_folder_loads_for_its_model_and_is_refused_for_another(tiny_llama, model_dirs, no_bench, tmp_path):
    handle = load_model(str(tiny_llama))
    save_thresholds(handle, calibrated(handle, "wina", 0.4, dynamic.calibration_windows(handle)), tmp_path / "own")
    other = load_model(str(model_dirs["other"]))
    save_thresholds(other, calibrated(other, "cats", 0.4, dynamic.calibration_windows(other)), tmp_path / "foreign")
    at = dynamic_page()
    at.selectbox(key=keys.W_DYN_METHOD).set_value(dynamic.FOLDER).run()
    assert any("Load a folder" in i.value for i in at.info)
    at.text_input(key=keys.W_DYN_FOLDER).input(str(tmp_path / "foreign")).run()
    next(b for b in at.button if b.label == "Load").click().run()
    assert "calibrated for model" in at.error[0].value and not at.exception
    at.text_input(key=keys.W_DYN_FOLDER).input(str(tmp_path / "own")).run()
    next(b for b in at.button if b.label == "Load").click().run()
    assert not at.exception and not at.error
    assert any(k.startswith("Perplexity, wina 40% from") for k in metrics(at))


def test_benchmark_figures_are_drawn_only_where_both_files_agree(tiny_llama, no_bench):
    (no_bench / "dynamic.csv").write_text("method,target,ppl_main,ratio_main\ncats,0.5,40.0,1.25\n"
                                          "cats,0.25,34.0,1.0625\nteal,0.5,52.0,1.625\n")
    (no_bench / "dynamic_decode.csv").write_text("config,target_sparsity,speedup\ndense,0.0,1.0\n"
                                                 "cats 25%,0.25,0.85\ncats 50%,0.5,0.96\n")
    points, dense, notes = dynamic.bench_points()
    assert sorted(points[["method", "target"]].itertuples(index=False, name=None)) == [("cats", 0.25), ("cats", 0.5)]
    assert dense == pytest.approx(32.0)
    assert any("teal" in n for n in notes)
    at = dynamic_page()
    assert any("Quality vs speed" in spec for spec in charts(at))
    assert any("dynamic_decode.csv has no measured decode speed-up for teal" in c.value for c in at.caption)


def test_the_quality_vs_speed_points_compare_float32_decodes_only(tiny_llama, no_bench):
    """A 4-bit row's speed-up is against dense int4, not the fp32 baseline: it is no point on this chart."""
    (no_bench / "dynamic.csv").write_text("method,target,ppl_main,ratio_main\nipn,0.5,35.0,1.03\n"
                                          "ipn-aligned,0.5,34.9,1.027\n")
    (no_bench / "dynamic_decode.csv").write_text(
        "config,precision,target_sparsity,speedup\ndense,fp32,0.0,1.0\ndense int4,int4 FFN,0.0,1.53\n"
        "ipn 0.50-a,fp32,0.5,1.00\nipn 0.50-a int4,int4 FFN,0.5,1.15\nipn-aligned 0.50-b,fp32,0.5,1.07\n")
    points, _, _ = dynamic.bench_points()
    got = sorted(points[["method", "speedup"]].itertuples(index=False, name=None))
    assert got == [("ipn", 1.0), ("ipn-aligned", 1.07)]


def test_an_encoder_gets_a_notice_instead_of_the_page(tiny_llama, model_dirs):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state[keys.W_MODEL_OPTION] = OTHER_MODEL
    at.session_state[keys.W_MODEL_PATH] = str(model_dirs["bert"])
    at.run()
    dynamic_page(at)
    assert "needs a causal language model" in at.info[0].value


def test_the_page_never_changes_the_shared_model(tiny_llama, no_bench):
    from headlab.ui.models import _load

    choice = ModelChoice(str(tiny_llama))
    handle = _load(choice.name, choice.device, choice.dtype, choice.trust_remote_code)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    at = dynamic_page()
    for method in ("wina", "ipn"):
        at.selectbox(key=keys.W_DYN_METHOD).set_value(method).run()
        assert not at.exception
    assert all(torch.equal(before[k], v) for k, v in handle.model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules()) == 0


def test_the_kept_channels_chart_has_a_line_and_a_band_per_method_over_layers(tiny_llama, no_bench):
    from headlab.ui.dynamic_figures import layer_kept_figure

    at = dynamic_page()
    assert any("No per-layer chart yet" in i.value and "dynamic_layers.csv" in i.value for i in at.info)
    lines = ["method,target,layer,ffn_dim,kept_mean,kept_p10,kept_p90"]
    for method, spread in (("oracle", 0), ("ipn", 100)):
        for target in (0.5, 0.7):
            lines += [f"{method},{target},{layer},1536,{(1 - target) * 1536},{(1 - target) * 1536 - spread},"
                      f"{(1 - target) * 1536 + spread}" for layer in range(3)]
    (no_bench / "dynamic_layers.csv").write_text("\n".join(lines) + "\n")
    layers, notes = dynamic.bench_layers()
    assert not notes and sorted(layers["target"].unique()) == [0.5, 0.7] and len(layers) == 12
    fig = layer_kept_figure(layers, 0.7)
    named = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in named] == ["oracle", "ipn"]
    assert list(named[1].x) == [0, 1, 2] and named[1].y[0] == pytest.approx(0.3)
    band = next(t for t in fig.data if t.name == "ipn 10th-90th percentile")
    assert max(band.y) == pytest.approx((0.3 * 1536 + 100) / 1536) and min(band.y) == pytest.approx(
        (0.3 * 1536 - 100) / 1536)
    assert fig.layout.xaxis.title.text == "layer"
    assert fig.layout.yaxis.title.text == "FFN channels kept per token (of 1536)"
    at = dynamic_page()
    assert any("FFN channels kept per token, by layer, at 50%" in spec for spec in charts(at))
    at.selectbox(key=keys.W_DYN_BENCH_TARGET).set_value(0.7).run()
    assert any("at 70% target sparsity" in spec for spec in charts(at))


def test_the_page_says_when_the_models_weights_are_natively_4bit(tiny_llama, no_bench, tmp_path, monkeypatch):
    """No note for a float model; for one whose gate/up hold 16 values per group of 32, the note and why rotated."""
    from tests.test_dynamic_rotation import _on_a_4bit_grid

    at = dynamic_page()
    assert not any("4-bit" in i.value for i in at.info)
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight.copy_(_on_a_4bit_grid(*proj.weight.shape))
    monkeypatch.setenv("HEADLAB_MODEL", str(save_tiny(tmp_path / "tiny-4bit", model=model)))
    at = dynamic_page()
    notes = [i.value for i in at.info if "natively 4-bit" in i.value]
    assert len(notes) == 1 and "own grid" in notes[0] and "rotated input space by default" in notes[0]
