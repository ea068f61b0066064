"""The measured ("kl") allocation: OBS costs scaled per layer by the KL its pruning alone causes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.objective import token_logits
from headlab.engine.core.tokens import encode_batch
from headlab.engine.pruning.reconstruct.joint import counts_from_costs, joint_counts, obs_costs, unit_params
from headlab.engine.pruning.reconstruct.layerwise import RefitConfig
from headlab.engine.pruning.reconstruct.measured import LayerCurve, kl_costs, single_layer_mask
from headlab.engine.pruning.strategies import Budget, Calibration
from headlab.engine.pruning.strategies.reconstruct import ObsStrategy, layer_counts
from tests.test_reconstruct import TEXTS
from tests.tiny import tiny_handle

CONFIG = RefitConfig(max_length=64, batch_size=4)


def _full_forward_kl(h, mask, texts, max_length) -> float:
    """Mean KL(dense || masked) over predicting positions, by two plain forwards (no replay)."""
    ids, am = encode_batch(h.tokenizer, list(texts), max_length)
    with torch.no_grad():
        dense = token_logits(h, ids, am)
        with gates.apply(h, mask):
            pruned = token_logits(h, ids, am)
    pos = am.bool().clone()
    pos[:, -1] = False
    pos &= am.bool().roll(-1, dims=1)
    p, q = F.log_softmax(dense[pos].float(), -1), F.log_softmax(pruned[pos].float(), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="sum")) / int(pos.sum())


def test_a_curve_scale_is_the_least_squares_fit_through_the_origin():
    c = LayerCurve([(1, 2.0, 1.0), (2, 4.0, 2.5)])
    assert c.scale == pytest.approx((2 * 1 + 4 * 2.5) / (4 + 16))
    assert LayerCurve([(1, 0.0, 0.3)]).scale == 0.0  # no OBS cost: nothing to scale (dead units go first)
    assert LayerCurve([(1, 1.0, -0.01)]).scale == 0.0  # a KL below the replay's noise is not a negative cost


def test_the_measured_kl_is_the_kl_of_a_plain_forward_under_the_one_layer_mask():
    h = tiny_handle("llama")
    _, curves = kl_costs(h, TEXTS, CONFIG, kl_texts=8, kl_length=32)
    seen = {}
    obs_costs(h, TEXTS, CONFIG, visit=lambda layer, kind, m, res: seen.setdefault((layer, kind), (m, res)))
    g = h.geometry
    for (layer, kind), (m, res) in seen.items():
        for n, cum, kl in curves[kind][layer].points:
            mask = single_layer_mask(h, layer, kind, m, res.removed, n, CONFIG)
            assert mask.first_changed_layer(mask.dense(g)) == layer
            units = mask.kept_units(layer, kind)
            assert len(units) == (g.n_heads if kind == "attn" else g.ffn_dim) - n
            assert set(res.removed[:n]).isdisjoint(units)
            assert cum == pytest.approx(sum(res.costs[:n]))
            assert kl == pytest.approx(_full_forward_kl(h, mask, TEXTS[:8], 32), rel=1e-3, abs=1e-7)
            assert kl > 0.0  # the tiny model's layers all matter


def test_kl_costs_are_the_obs_costs_times_each_layers_scale():
    h = tiny_handle("llama")
    scaled, curves = kl_costs(h, TEXTS, CONFIG, kl_texts=8, kl_length=32)
    plain = obs_costs(h, TEXTS, CONFIG)
    for kind in plain:
        for layer, (s, c) in enumerate(zip(scaled[kind], plain[kind])):
            torch.testing.assert_close(s, c * curves[kind][layer].scale)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        kl_costs(h, TEXTS, CONFIG, fractions=(0.5, 1.0))


def test_kl_allocations_meet_the_budget_and_the_mask_records_its_curves():
    h, calib = tiny_handle("llama"), Calibration(list(TEXTS), max_length=64, name="tiny")
    heads, channels = layer_counts(h, Budget(heads=3, ffn=77), calib, "kl")
    assert sum(heads) == 3 and sum(channels) == 77
    heads, channels = layer_counts(h, Budget(heads=3, ffn=77), calib, "kl-joint")
    p = unit_params(h)
    asked = 3 * p["attn"] + 77 * p["ffn"]
    assert abs(sum(heads) * p["attn"] + sum(channels) * p["ffn"] - asked) <= max(p.values())
    m = ObsStrategy(allocation="kl")(h, Budget(heads=3, ffn=77), calib)
    curves = m.meta["allocation_curves"]
    assert m.meta["allocation"] == "kl" and m.meta["allocation_texts"] == len(TEXTS)
    assert len(curves["attn"]) == len(curves["ffn"]) == h.geometry.n_layers
    assert all(c["scale"] >= 0 for kind in curves.values() for c in kind)


def test_a_heads_only_budget_measures_only_the_heads():
    h, calib = tiny_handle("llama"), Calibration(list(TEXTS), max_length=64, name="tiny")
    scaled, curves = kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32, kinds=("attn",))
    assert curves["ffn"] == [] and len(curves["attn"]) == h.geometry.n_layers
    assert [c.numel() for c in scaled["ffn"]] == [0] * h.geometry.n_layers, "no channel costs measured"
    for a, b, curve in zip(scaled["attn"], obs_costs(h, TEXTS, CONFIG, kinds=("attn",))["attn"], curves["attn"],
                           strict=True):
        assert a.numel() > 0
        torch.testing.assert_close(a, b * curve.scale)
    m = ObsStrategy(allocation="kl")(h, Budget(heads=3), calib)
    assert set(m.meta["allocation_curves"]) == {"attn"} and m.summary()["heads_pruned"] == 3


def test_kl_and_kl_joint_on_the_same_texts_measure_the_curves_once(monkeypatch):
    from headlab.engine.pruning.reconstruct import measured

    h = tiny_handle("llama")
    first, _ = kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32)
    first["attn"][0].zero_()  # a caller's copy: changing it leaves the memo as measured

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(measured, "obs_costs", fail)
    again, _ = kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32)
    assert bool(again["attn"][0].any())
    with pytest.raises(AssertionError, match="measured again"):  # other texts are measured
        kl_costs(h, TEXTS[:6], CONFIG, kl_texts=4, kl_length=32)


def test_a_heads_only_global_allocation_skips_the_channels_and_counts_the_same():
    h = tiny_handle("llama")
    both, heads_only = obs_costs(h, TEXTS, CONFIG), obs_costs(h, TEXTS, CONFIG, kinds=("attn",))
    for a, b in zip(both["attn"], heads_only["attn"], strict=True):
        torch.testing.assert_close(a, b)
    assert all(c.numel() == 0 for c in heads_only["ffn"]) and all(c.numel() > 0 for c in both["ffn"])
    counts = joint_counts(h, 3, 0, TEXTS, CONFIG)
    assert counts == counts_from_costs(h, both, 3, 0) and sum(counts[0]) == 3 and counts[1] == [0, 0]
    with pytest.raises(ValueError, match="kinds must be"):
        obs_costs(h, TEXTS, CONFIG, kinds=("mlp",))


def test_the_kl_points_are_a_setting_of_the_strategy():
    h, calib = tiny_handle("llama"), Calibration(list(TEXTS), max_length=64, name="tiny")
    g = h.geometry
    m = ObsStrategy(allocation="kl", kl_fractions="0.75/0.25/0.5")(h, Budget(heads=3, ffn=77), calib)
    assert m.meta["allocation_kl_fractions"] == [0.25, 0.5, 0.75]
    for kind, size in (("attn", g.n_heads), ("ffn", g.ffn_dim)):
        for curve in m.meta["allocation_curves"][kind]:  # one point per fraction (counts differ on these sizes)
            assert [n for n, _, _ in curve["points"]] == sorted({max(1, round(f * size)) for f in (0.25, 0.5, 0.75)})
    default = ObsStrategy(allocation="kl")(h, Budget(heads=3, ffn=77), calib)
    assert default.meta["allocation_kl_fractions"] == [0.25, 0.5]
    assert ObsStrategy(kl_fractions=0.5).kl_fractions == (0.5,)
    for bad in ("0.5/1", "0", "a/b", ""):
        with pytest.raises(ValueError, match="kl_fractions"):
            ObsStrategy(kl_fractions=bad)


def test_a_measurement_is_kept_in_the_store_and_read_back_instead_of_measured_again(tmp_path, monkeypatch):
    from headlab.engine.pruning.reconstruct import measured

    h, store = tiny_handle("llama"), tmp_path / "kl_costs"
    costs, curves = kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32, store=store)
    files = list(store.glob("*.safetensors"))
    assert len(files) == 1 and not [p for p in store.iterdir() if p.name.startswith(".")]  # written whole, once
    measured._MEMO.pop(h.model)  # a new process: nothing in memory

    def no_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(measured, "_measure", no_measure)
    again, curves_again = kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32, store=store)
    assert all(torch.equal(a, b) for kind in costs for a, b in zip(costs[kind], again[kind], strict=True))
    assert [[c.points, c.scale] for c in curves["ffn"]] == [[c.points, c.scale] for c in curves_again["ffn"]]
    # other texts, other settings or another model's weights read nothing (and would measure)
    for call in (lambda: kl_costs(h, TEXTS[:-1], CONFIG, kl_texts=4, kl_length=32, store=store),
                 lambda: kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32, store=store, fractions=(0.5,)),
                 lambda: kl_costs(tiny_handle("llama", seed=1), TEXTS, CONFIG, kl_texts=4, kl_length=32,
                                  store=store)):
        with pytest.raises(AssertionError, match="measured again"):
            call()
    # a damaged file is measured again, not trusted
    files[0].write_bytes(b"not safetensors")
    measured._MEMO.pop(h.model)
    with pytest.raises(AssertionError, match="measured again"):
        kl_costs(h, TEXTS, CONFIG, kl_texts=4, kl_length=32, store=store)


def test_a_calibration_with_a_persist_dir_keeps_the_kl_allocation_there(tmp_path):
    h = tiny_handle("llama")
    calib = Calibration(list(TEXTS), max_length=64, name="tiny")
    calib.persist_dir = tmp_path
    ObsStrategy(allocation="kl-joint")(h, Budget(heads=3, ffn=77), calib)
    assert len(list((tmp_path / "kl_costs").glob("*.safetensors"))) == 1
