"""The reconstruction strategies by name, the per-layer counts they use, and the width size target."""

from __future__ import annotations

import pytest
import torch
import transformers

from headlab.engine.cli.main import main
from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.data.datasets import read_wikitext, wikitext_calibration
from headlab.engine.export.write import export
from headlab.engine.pruning.reconstruct.joint import unit_params
from headlab.engine.pruning.strategies import Budget, Calibration, get_strategy
from headlab.engine.pruning.strategies.depth import depth_prune
from headlab.engine.pruning.strategies.reconstruct import (
    AUTO_ALLOCATION,
    DEPTH_INPUTS,
    ObsStrategy,
    depth_refit_prune,
    layer_counts,
    refit_texts,
    width_by_reconstruction,
)
from headlab.engine.runtime.replay import LayerReplay
from tests.test_reconstruct import TEXTS
from tests.tiny import save_tiny, tiny_handle


def _calib() -> Calibration:
    return Calibration(list(TEXTS), max_length=64, name="tiny")


def test_layer_counts_sum_to_the_budget_for_every_allocation():
    h, calib = tiny_handle("llama"), _calib()
    for allocation in ("owl", "uniform", "flap", "ablation", "global", "kl"):
        heads, channels = layer_counts(h, Budget(heads=3, ffn=77), calib, allocation)
        assert sum(heads) == 3 and sum(channels) == 77, allocation
    # "auto" with channels: AUTO_ALLOCATION["width"]; a joint one keeps the parameter count, not the two totals
    heads, channels = layer_counts(h, Budget(heads=3, ffn=77), calib, "auto")
    if AUTO_ALLOCATION["width"].endswith("joint"):
        p = unit_params(h)
        assert abs(sum(heads) * p["attn"] + sum(channels) * p["ffn"] - (3 * p["attn"] + 77 * p["ffn"])) <= p["attn"]
    else:
        assert sum(heads) == 3 and sum(channels) == 77


def test_allocations_that_would_empty_a_layer_leave_it_one_unit():
    h, calib = tiny_handle("llama"), _calib()
    heads, _ = layer_counts(h, Budget(heads=0.6), calib, "flap")
    assert sum(heads) == round(0.6 * 8) and max(heads) <= h.geometry.n_heads - 1


def _params_removed(h, heads: int, channels: int) -> int:
    p = unit_params(h)
    return heads * p["attn"] + channels * p["ffn"]


def test_obs_strategy_removes_the_budget_and_refits():
    h, calib = tiny_handle("llama"), _calib()
    m = get_strategy("obs", allocation="flap")(h, Budget(heads=3, ffn=77), calib)
    s = m.summary()
    assert (s["heads_pruned"], s["ffn_channels_pruned"]) == (3, 77)
    assert m.has_refit and m.meta["method"] == "obs"
    m = get_strategy("obs")(h, Budget(heads=3, ffn=77), calib)  # the default with channels: AUTO_ALLOCATION["width"]
    s = m.summary()
    assert m.meta["allocation"] == AUTO_ALLOCATION["width"] and m.has_refit
    asked, got = _params_removed(h, 3, 77), _params_removed(h, s["heads_pruned"], s["ffn_channels_pruned"])
    assert abs(got - asked) <= unit_params(h)["attn"]  # a joint allocation may move the split, not the size


def test_obs_can_refit_the_sub_blocks_that_lose_nothing():
    """A heads-only budget leaves every FFN whole: by default only the attention is re-solved; with
    refit_unpruned the FFNs are too (on their shifted inputs), and the mask says so."""
    h, calib = tiny_handle("llama"), _calib()
    g = h.geometry
    plain = ObsStrategy(allocation="uniform", inputs="none")(h, Budget(heads=g.n_layers), calib)
    both = ObsStrategy(allocation="uniform", inputs="none", refit_unpruned=True)(h, Budget(heads=g.n_layers), calib)
    assert torch.equal(plain.heads, both.heads) and bool(both.ffn.all())  # the same units go, no channel
    assert plain.refits("ffn") == {} and sorted(plain.refits("attn")) == list(range(g.n_layers))
    assert sorted(both.refits("ffn")) == list(range(g.n_layers))
    assert both.meta["reconstruction"]["refit_unpruned"] and not plain.meta["reconstruction"]["refit_unpruned"]
    errors = both.meta["reconstruction"]["relative_error"]["ffn"]
    assert all(e is not None for e in errors)
    with pytest.raises(ValueError, match="refit_unpruned must be true or false"):
        ObsStrategy(refit_unpruned="yes")


def test_obs_with_ffn_blocks_keeps_whole_blocks_in_every_layer_for_every_allocation():
    """Counts rounded before OBS chooses (a Q8_0 deployment: blocks of 32 channels), not after."""
    h, calib = tiny_handle("llama"), _calib()  # FFN 128 per layer
    for allocation in ("auto", "owl", "uniform", "kl-joint"):
        heads, channels = layer_counts(h, Budget(heads=3, ffn=77), calib, allocation, ffn_align=32)
        assert all((128 - c) % 32 == 0 and 128 - c >= 32 for c in channels), allocation
        if allocation == "auto" and AUTO_ALLOCATION["width"].endswith("joint") or allocation == "kl-joint":
            assert abs(_params_removed(h, sum(heads), sum(channels)) - _params_removed(h, 3, 77)) <= \
                _params_removed(h, 0, 16)  # within half a block of the asked size
        else:
            assert abs(sum(channels) - 77) <= 16
    m = ObsStrategy(ffn_align=32)(h, Budget(heads=3, ffn=77), calib)
    kept = m.ffn_effective().sum(dim=1).tolist()
    assert all(k % 32 == 0 for k in kept) and m.has_refit and m.meta["ffn_align"] == 32


def test_obs_with_even_groups_leaves_every_gqa_group_of_a_layer_the_same_size():
    """What llama.cpp runs without extra rows: each KV head of a layer keeps as many query heads."""
    h, calib = tiny_handle("llama"), _calib()  # 4 query heads in 2 groups of 2, 2 layers
    g = h.geometry
    for allocation in ("auto", "owl", "uniform", "kl-joint"):
        heads, _ = layer_counts(h, Budget(heads=3, ffn=20), calib, allocation, even_groups=True)
        assert all(c % g.n_kv_heads == 0 and c < g.n_heads for c in heads), allocation
        if not (allocation == "kl-joint" or allocation == "auto" and AUTO_ALLOCATION["width"].endswith("joint")):
            assert abs(sum(heads) - 3) <= 1
    m = ObsStrategy(even_groups=True, allocation="flap")(h, Budget(heads=2, ffn=20), calib)
    kept = m.heads_effective().reshape(g.n_layers, g.n_kv_heads, g.group_size).sum(-1)
    assert all(len(set(row)) == 1 for row in kept.tolist()) and int(kept.sum()) == g.n_heads * g.n_layers - 2
    assert m.meta["even_groups"] is True


def test_flap_refit_keeps_flaps_units_and_gets_closer_to_dense():
    h, calib = tiny_handle("llama"), _calib()
    budget = Budget(heads=2, ffn=60)
    flap = get_strategy("flap")(h, budget, calib)
    ours = get_strategy("flap-refit")(h, budget, calib)
    assert torch.equal(ours.heads_effective(), flap.heads_effective())
    assert torch.equal(ours.ffn_effective(), flap.ffn_effective())
    replay = LayerReplay(h, TEXTS)
    assert replay.kl(ours) < replay.kl(flap)


def test_depth_refit_drops_the_same_layers_as_its_base_method():
    h, calib = tiny_handle("llama"), _calib()
    m = depth_refit_prune(h, 0.7, "magnitude-refit", calib)
    assert m.meta["layers_dropped"] and m.has_refit
    assert int((m.attn == 0).sum()) == len(m.meta["layers_dropped"])
    assert 0 <= m.meta["stand_in"]["added_parameters"] <= 2 * h.geometry.hidden  # at most one bias per refit
    assert m.meta["reconstruction"]["inputs"] == DEPTH_INPUTS  # "auto": the input mode validation chose for depth
    shipped = Calibration.shipped("wikitext", 4, max_length=32)
    w = depth_refit_prune(h, 0.7, "magnitude-refit", shipped, n_texts=2, window=48)
    assert w.meta["layers_dropped"] == m.meta["layers_dropped"] and w.meta["fit_window"] == 48
    assert w.meta["reconstruction"]["calibration_texts"] == len(refit_texts(shipped, 2, h, window=48))
    assert w.meta["reconstruction"]["calibration_tokens"] > 32 * w.meta["reconstruction"]["calibration_texts"] // 2
    with pytest.raises(ValueError, match="shipped WikiText"):
        depth_refit_prune(h, 0.7, "magnitude-refit", calib, window=48)


def _same_refits(a: PruneMask, b: PruneMask) -> bool:
    pairs = [(a.attn_refit, b.attn_refit), (a.ffn_refit, b.ffn_refit), (a.attn_in, b.attn_in), (a.ffn_in, b.ffn_in)]
    def equal(u, v) -> bool:  # a LayerRefit (units, weight) or an input map's tensors
        if hasattr(u, "weight"):
            return u.units == v.units and torch.equal(u.weight, v.weight)
        return all(torch.equal(p, q) for p, q in zip(u, v)) if isinstance(u, tuple) else torch.equal(u, v)
    return all(x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x) for x, y in pairs) and all(
        (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
        for u, v in ((a.attn_bias, b.attn_bias), (a.ffn_bias, b.ffn_bias)))


def test_depth_refit_reuses_a_given_layer_search_and_refuses_a_foreign_one():
    h, calib = tiny_handle("llama"), _calib()
    search = depth_prune(h, 0.7, "magnitude", calib)
    fresh = depth_refit_prune(h, 0.7, "magnitude-refit", calib)
    reused = depth_refit_prune(h, 0.7, "magnitude-refit", calib, dropped=search.clone())
    assert reused.meta["layers_dropped"] == fresh.meta["layers_dropped"]
    assert _same_refits(reused, fresh)  # the same layers and the same re-fitted weights
    damped = depth_refit_prune(h, 0.7, "magnitude-refit", calib, dropped=search.clone(), damp=0.5)
    assert damped.meta["reconstruction"]["damp"] == 0.5 and not _same_refits(damped, fresh)
    other_method = depth_prune(h, 0.7, "entropy", calib)
    other_size = PruneMask.dense(h.geometry)  # the tiny model has two layers: keep=0.7 drops one, this none
    other_size.meta.update({**search.meta, "layers_dropped": []})
    other_calib = depth_prune(h, 0.7, "magnitude", Calibration.shipped("wikitext", 3, max_length=24))
    width = search.clone()
    width.heads[0, 0] = 0.0
    for foreign in (other_method, other_size, other_calib, width):
        with pytest.raises(ValueError, match="not magnitude's at keep=0.7"):
            depth_refit_prune(h, 0.7, "magnitude-refit", calib, dropped=foreign)


def test_uniform_width_export_reloads_with_plain_transformers(tmp_path):
    h = tiny_handle("llama")
    r = width_by_reconstruction(h, 0.8, _calib(), uniform=True)
    assert r.mask.has_bias and r.mask.has_refit  # Llama's config switches the biases on
    assert abs(r.kept_fraction - 0.8) < 0.05
    out = export(h, r.mask, tmp_path / "out", evaluate=False)
    assert out.layout == "uniform"
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(ids)
    with torch.no_grad(), gates.apply(h, r.mask):
        ref = token_logits(h, ids, am)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=am).logits, ref, atol=1e-4, rtol=0)


def test_uniform_width_without_a_bias_switch_fits_without_an_intercept():
    h = tiny_handle("qwen2")
    r = width_by_reconstruction(h, 0.8, _calib(), uniform=True)
    assert not r.mask.has_bias and r.mask.has_refit and "no bias" in r.criterion


def test_default_width_target_lands_near_the_asked_size():
    h = tiny_handle("llama")
    r = width_by_reconstruction(h, 0.8, _calib())
    assert abs(r.kept_fraction - 0.8) < 0.03 and r.mask.has_refit


def test_cli_export_by_width_reconstructs_and_by_depth_takes_a_refit_method(tmp_path, capsys):
    src = save_tiny(tmp_path / "src")
    common = ["--model", str(src), "--keep", "0.8", "--no-eval", "--n-texts", "8", "--refit-texts", "8",
              "--max-length", "64"]
    assert main(["export", *common, "--route", "width", "--layout", "uniform", "--out", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "obs (uniform)" in out and "uniform layout" in out
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert main(["export", *common, "--route", "depth", "--method", "magnitude-refit", "--out", str(tmp_path / "d")]) == 0
    assert "magnitude-refit" in capsys.readouterr().out
    assert main(["export", *common, "--route", "depth", "--method", "magnitude-refit", "--refit-window", "48",
                 "--save-mask", str(tmp_path / "dw.json"), "--out", str(tmp_path / "dw")]) == 0
    assert PruneMask.load(tmp_path / "dw.json").meta["fit_window"] == 48
    assert main(["export", *common, "--route", "depth", "--method", "magnitude-refit", "--refit-damp", "0.001",
                 "--save-mask", str(tmp_path / "dd.json"), "--out", str(tmp_path / "dd")]) == 0
    assert PruneMask.load(tmp_path / "dd.json").meta["reconstruction"]["damp"] == 0.001
    for bad in (["--route", "width"], ["--route", "depth", "--method", "magnitude"],
                ["--route", "depth", "--method", "magnitude-refit", "--refit-damp", "-1"]):
        assert main(["export", *common, "--refit-damp", "0.001", *bad, "--out", str(tmp_path / "bad")]) != 0
        assert "--refit-damp" in capsys.readouterr().err
    assert main(["export", *common, "--route", "width", "--allocation", "kl-joint", "--save-mask",
                 str(tmp_path / "k.json"), "--out", str(tmp_path / "k")]) == 0
    assert "by the kl-joint allocation" in capsys.readouterr().out
    assert PruneMask.load(tmp_path / "k.json").meta["allocation"] == "kl-joint"
    assert main(["export", *common, "--route", "width", "--layout", "uniform", "--refit-window", "48", "--save-mask",
                 str(tmp_path / "s.json"), "--out", str(tmp_path / "s")]) == 0
    meta = PruneMask.load(tmp_path / "s.json").meta
    assert meta["fit_window"] == 48 and meta["reconstruction"]["calibration_texts"] > 8, "the 8 paragraphs' span, cut"
    assert main(["export", *common, "--route", "width", "--refit-window", "1", "--out", str(tmp_path / "bad")]) != 0
    assert "at least 2 tokens" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("uniform", [True, False])
def test_reconstructed_export_reloaded_has_the_in_engine_perplexity(tmp_path, uniform):
    """The exported folder, reloaded (plain transformers for the uniform layout, headlab.engine.models.load.load_pruned for
    the per-layer one), scores the protocol exactly as the masked shared model does in the engine."""
    from headlab.engine.models.load import load_pruned, wrap_model
    from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity
    from tests.tiny import tiny_tokenizer

    h, protocol = tiny_handle("llama"), PerplexityProtocol(window=64, stride=64, n_windows=3)
    r = width_by_reconstruction(h, 0.8, _calib(), uniform=uniform)
    out = export(h, r.mask, tmp_path / "out", protocol=protocol)
    in_engine = perplexity(h, r.mask, protocol).perplexity
    assert out.manifest["perplexity"]["after"]["perplexity"] == pytest.approx(in_engine, rel=1e-6)
    if uniform:
        reloaded = wrap_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(),
                              tiny_tokenizer(), name="reloaded")
    else:
        reloaded = load_pruned(tmp_path / "out")
    assert perplexity(reloaded, None, protocol).perplexity == pytest.approx(in_engine, rel=1e-5)
    assert perplexity(h, None, protocol).perplexity != pytest.approx(in_engine, rel=1e-4)  # the mask does change it


def test_a_global_allocation_measures_its_costs_on_the_texts_the_refit_reads(monkeypatch):
    """obs[allocation=global,n_texts=N] on a shipped calibration holding fewer texts: both read the same N."""
    from headlab.engine.pruning.strategies import reconstruct

    h = tiny_handle("llama")
    calib = Calibration.shipped("wikitext", 4, max_length=64)
    seen: dict[str, list[str]] = {}
    real_joint, real_obs = reconstruct.joint_counts, reconstruct.obs_prune

    def joint(handle, heads, channels, texts, *args, **kwargs):
        seen["allocation"] = list(texts)
        return real_joint(handle, heads, channels, texts, *args, **kwargs)

    def obs(handle, heads, channels, texts, *args, **kwargs):
        seen["refit"] = list(texts)
        return real_obs(handle, heads, channels, texts, *args, **kwargs)

    monkeypatch.setattr(reconstruct, "joint_counts", joint)
    monkeypatch.setattr(reconstruct, "obs_prune", obs)
    m = ObsStrategy(allocation="global", n_texts=6)(h, Budget(heads=3), calib)
    assert len(seen["refit"]) == 6 and seen["allocation"] == seen["refit"]
    assert m.meta["allocation_texts"] == 6 and m.meta["allocation"] == "global"


def test_obs_can_fit_on_windows_of_running_text_over_the_paragraphs_span():
    h = tiny_handle("llama")
    shipped = Calibration.shipped("wikitext", 4, max_length=32)
    windows = refit_texts(shipped, 2, h, window=48)
    text = read_wikitext()
    span = text[text.rfind(wikitext_calibration(2)[-1]):]
    assert len(windows) > 2 and all(len(h.tokenizer(w, add_special_tokens=False)["input_ids"]) <= 48 for w in windows)
    starts = [span.find(w) for w in windows]
    assert all(s >= 0 for s in starts) and starts == sorted(starts), "in-order pieces of the file's own text"
    assert sum(map(len, windows)) >= 0.9 * len(span.strip()) - 2 * len(windows), "the whole span, cut where needed"
    mask = ObsStrategy(allocation="global", n_texts=2, window=48)(h, Budget(heads=1, ffn=20), shipped)
    assert mask.meta["fit_window"] == 48 and mask.meta["reconstruction"]["calibration_texts"] == len(windows)
    assert mask.meta["reconstruction"]["calibration_tokens"] > 32 * len(windows) // 2, "whole windows, not 32 tokens"
    with pytest.raises(ValueError, match="shipped WikiText"):
        refit_texts(_calib(), 2, h, window=48)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ObsStrategy(window=1)
