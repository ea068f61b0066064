"""The importance network (headlab.engine.dynamic.ipn) on a tiny Llama: calibration, exactness, training, storage, agreement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.dynamic import calibration_ids
from headlab.engine.dynamic.ipn import (
    IPN,
    IPNConfig,
    IPNError,
    apply_ipn,
    ffn_sparsity,
    ipn_perplexity,
    load_ipn,
    oracle_agreement,
    save_ipn,
    train_ipn,
    untrained_ipn,
)
from headlab.engine.dynamic.ipn.store import META_FILE, TENSORS_FILE
from headlab.engine.dynamic.rules import oracle_keep
from headlab.engine.dynamic.sketch import Int4Sketch
from headlab.engine.runtime.evaluate import PerplexityProtocol
from tests.tiny import tiny_handle

PROTOCOL = PerplexityProtocol(window=64, stride=64, n_windows=2)


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def ids(llama):
    return calibration_ids(llama, window=64, n_windows=4)


def _logits(handle, ids):
    with torch.no_grad():
        return handle.model(input_ids=ids).logits


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_sketch_is_close_and_kernel_matches_its_levels():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    s = Int4Sketch.of(w)
    assert (s.dequantized() - w).abs().max() <= (w.max() - w.min()) / 15  # within one level of its group
    x = torch.randn(3, 64)
    ref = x @ s.dequantized().T
    torch.testing.assert_close(s.matmul(x), ref, rtol=0.02, atol=0.05)  # bf16 activations in the kernel
    torch.testing.assert_close(s.matmul(x, kernel=False), ref)
    with pytest.raises(ValueError, match="multiple"):
        Int4Sketch.of(torch.randn(8, 40))


@pytest.mark.parametrize("target", [0.25, 0.5, 0.7])
def test_untrained_thresholds_hit_the_target_on_their_calibration_windows(llama, ids, target):
    ipn = untrained_ipn(llama, target, ids)
    assert abs(ffn_sparsity(llama, ipn, ids) - target) <= 0.01


def test_minus_infinity_threshold_is_the_dense_model(llama, ids):
    ipn = IPN.for_model(llama, adaptive=False)
    with torch.no_grad():
        ipn.tau.fill_(-math.inf)
    dense = _logits(llama, ids)
    with apply_ipn(llama, ipn) as meter:
        out = _logits(llama, ids)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    assert meter.report().ffn == 0.0
    assert _hooks(llama.model) == 0


def test_masks_zero_exactly_the_channels_the_network_drops(llama, ids):
    """The masked model equals one whose dropped channels' down inputs are zeroed by hand."""
    ipn = untrained_ipn(llama, 0.5, ids)
    adapter = llama.adapter
    from headlab.engine.core.hooks import temporary_hooks

    with temporary_hooks() as hooks:
        for layer in range(llama.geometry.n_layers):
            p = adapter.projections(layer)
            seen = []
            hooks.pre(p["gate"], lambda m, a, layer=layer, seen=seen: seen.append(ipn.channel_keep(layer, a[0])))
            hooks.pre(p["down"], lambda m, a, seen=seen: (a[0] * seen.pop(),))
        by_hand = _logits(llama, ids)
    with apply_ipn(llama, ipn):
        out = _logits(llama, ids)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _logits(llama, ids), atol=1e-3)


def test_head_masks_match_the_gates_for_a_layer_without_heads(llama, ids):
    """Dropping every head of layer 0 for every token equals a static mask removing layer 0's heads."""
    ipn = IPN.for_model(llama, heads=True, adaptive=False)
    with torch.no_grad():
        ipn.tau.fill_(-math.inf)  # every channel kept
        ipn.head_bias[0].fill_(-10.0)  # every head of layer 0 dropped
    mask = PruneMask.dense(llama.geometry)
    mask.heads[0] = 0
    with gates.apply(llama, mask):
        ref = _logits(llama, ids)
    with apply_ipn(llama, ipn) as meter:
        out = _logits(llama, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert meter.report().per_layer["o"] == [1.0, 0.0]


def test_training_moves_only_the_network_and_reaches_the_target(llama, ids):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    steps = []
    run = train_ipn(llama, IPNConfig(target=0.5, steps=4, batch=2, window=64, n_windows=4), ids,
                    on_step=steps.append)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and run.history == steps
    assert all(math.isfinite(s["kl"]) and s["kl"] >= -1e-6 for s in steps)
    assert all(len(s["layer_sparsity"]) == llama.geometry.n_layers for s in steps)
    assert abs(run.measured_sparsity - 0.5) <= 0.01
    assert all(torch.equal(v, before[k]) for k, v in llama.model.state_dict().items())
    assert all(p.grad is None for p in llama.model.parameters())
    assert _hooks(llama.model) == 0
    untrained = IPN.for_model(llama)
    assert any(not torch.equal(a, b) for a, b in zip(run.ipn.parameters(), untrained.parameters()))


def test_training_can_stop_early(llama, ids):
    run = train_ipn(llama, IPNConfig(target=0.5, steps=50, batch=2, window=64, n_windows=4), ids,
                    should_stop=lambda: True)
    assert run.stopped and run.history == []


def test_config_is_checked():
    with pytest.raises(IPNError, match="target"):
        IPNConfig(target=1.0)
    with pytest.raises(IPNError, match="batch"):
        IPNConfig(batch=9, n_windows=8)
    with pytest.raises(IPNError, match="steps"):
        IPNConfig(steps=0)


def test_saved_network_reloads_to_identical_masks(llama, ids, tmp_path):
    run = train_ipn(llama, IPNConfig(target=0.5, heads=True, steps=2, batch=2, window=64, n_windows=4), ids)
    save_ipn(llama, run.ipn, tmp_path / "ipn", meta={"history": run.history})
    loaded = load_ipn(llama, tmp_path / "ipn")
    x = torch.randn(2, 5, llama.geometry.hidden)
    for layer in range(llama.geometry.n_layers):
        assert torch.equal(loaded.channel_keep(layer, x), run.ipn.channel_keep(layer, x))
        assert torch.equal(loaded.head_keep(layer, x), run.ipn.head_keep(layer, x))
    assert not list(tmp_path.joinpath("ipn").glob(".*tmp"))


def test_loading_refuses_other_models_and_corrupt_files(llama, ids, tmp_path):
    folder = save_ipn(llama, untrained_ipn(llama, 0.5, ids), tmp_path / "ipn")
    with pytest.raises(IPNError, match="other weights"):
        load_ipn(tiny_handle("llama", seed=1), folder)
    other = tiny_handle("qwen2")
    other.name = llama.name
    with pytest.raises(IPNError):
        load_ipn(other, folder)
    renamed = tiny_handle("llama")
    renamed.name = "someone-else"
    with pytest.raises(IPNError, match="trained for model"):
        load_ipn(renamed, folder)
    data = bytearray((folder / TENSORS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (folder / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(IPNError, match="corrupt or altered"):
        load_ipn(llama, folder)
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(IPNError):
        load_ipn(llama, folder)
    with pytest.raises(FileNotFoundError, match=TENSORS_FILE):
        load_ipn(llama, tmp_path / "nowhere")


def test_network_for_another_shape_is_refused(llama):
    ipn = IPN(3, 128, 64, 4)
    with pytest.raises(IPNError, match="shaped for"):
        ipn.attach(llama)


def test_agreement_with_the_oracle(llama, ids):
    ipn = untrained_ipn(llama, 0.5, ids)
    rows = oracle_agreement(llama, ipn, ids)
    assert len(rows) == llama.geometry.n_layers
    for row in rows:
        assert 0.0 <= row.recall <= 1.0 and 0.0 <= row.precision <= 1.0
        assert row.recall > 0.8  # the sketch's estimate of |act(gate) * up| ranks like the truth
        assert abs(row.kept - 0.5) < 0.05
    # A network whose scores ignore the input entirely keeps a fixed set: about chance recall.
    fixed = IPN.for_model(llama, adaptive=False)
    with torch.no_grad():
        fixed.alpha.zero_(), fixed.beta.zero_()
        fixed.channel_bias.copy_(torch.randn_like(fixed.channel_bias))
    rows = oracle_agreement(llama, fixed, ids)
    assert all(r.recall < 0.7 for r in rows)


def test_oracle_keep_is_exactly_k():
    h = torch.randn(3, 7, 50)
    keep = oracle_keep(h, 20)
    assert bool((keep.sum(-1) == 20).all())
    smallest_kept = h.abs().masked_fill(~keep, math.inf).amin(-1)
    largest_dropped = h.abs().masked_fill(keep, -math.inf).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())


def test_perplexity_under_the_network(llama, ids):
    ipn = untrained_ipn(llama, 0.5, ids)
    r = ipn_perplexity(llama, ipn, PROTOCOL)
    assert math.isfinite(r.result.perplexity) and r.sparsity.rule == "ipn"
    assert 0.3 < r.sparsity.ffn < 0.7
    json.dumps(r.to_dict())


def test_joint_lora_trains_adapters_without_touching_the_model(llama, ids, tmp_path):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    run = train_ipn(llama, IPNConfig(target=0.5, steps=3, batch=2, window=64, n_windows=4, lora_rank=4), ids)
    assert run.ipn.lora_b.detach().abs().sum() > 0  # B left zero would mean the adapters never trained
    assert all(torch.equal(v, before[k]) for k, v in llama.model.state_dict().items())
    with apply_ipn(llama, run.ipn):
        with_lora = _logits(llama, ids)
    zeroed = load_ipn(llama, save_ipn(llama, run.ipn, tmp_path / "lora"))
    with apply_ipn(llama, zeroed):
        torch.testing.assert_close(_logits(llama, ids), with_lora, rtol=0, atol=0)
    with torch.no_grad():
        zeroed.lora_b.zero_()
    plain = IPN.for_model(llama, adaptive=zeroed.adaptive)
    plain.load_state_dict({k: v for k, v in zeroed.state_dict().items() if not k.startswith("lora_")})
    with apply_ipn(llama, zeroed):
        a = _logits(llama, ids)
    with apply_ipn(llama, plain):
        b = _logits(llama, ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_key_changes_with_every_setting_and_the_windows(llama, ids):
    """A cached network is found by this key: any setting that changes the training must change it."""
    from dataclasses import fields, replace

    from headlab.engine.dynamic.ipn import training_key

    base = IPNConfig(target=0.5, steps=100, batch=2, window=64, n_windows=4)
    key = training_key(llama, base, ids)
    assert key == training_key(llama, IPNConfig(target=0.5, steps=100, batch=2, window=64, n_windows=4), ids)
    assert training_key(llama, replace(base, steps=50), ids) != key  # a 50-step network is not a 100-step one
    changed = {"target": 0.4, "heads": True, "head_target": 0.3, "adaptive": False, "steps": 101, "batch": 1,
               "window": 32, "n_windows": 3, "lr": 0.02, "sparsity": 2.0, "consistency": 0.1,
               "temperature": 0.25, "lora_rank": 2, "lora_lr": 2e-3, "seed": 1, "sketch": "aligned"}
    other = {f.name: getattr(base, f.name) for f in fields(IPNConfig)} | changed
    for f in fields(IPNConfig):  # a field added later without a value above fails here, not silently
        assert f.name in changed, f"give IPNConfig.{f.name} a changed value in this test"
        assert training_key(llama, replace(base, **{f.name: other[f.name]}), ids) != key, f.name
    assert training_key(llama, base, ids[:3]) != key
    assert training_key(llama, base, ids.flip(1)) != key
    renamed = tiny_handle("llama")
    renamed.name = "another-model"
    assert training_key(renamed, base, ids) != key
