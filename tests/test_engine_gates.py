"""Masks applied through hooks: exactness, gradients, per-sample masks, cleanup, isolation."""

from __future__ import annotations

import threading

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.objective import token_logits

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 8, 1, 64], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
MASK = torch.ones_like(IDS)


def logits(handle, ids=IDS):
    with torch.no_grad():
        return token_logits(handle, ids, torch.ones_like(ids))


def zero_o_input_by_hand(handle, layer, head):
    """Reference: zero one head's slice of the O-projection input with a raw hook."""
    hd = handle.geometry.head_dim
    proj = handle.adapter.head_output_proj(layer)

    def hook(module, args):
        x = args[0].clone()
        x[..., head * hd : (head + 1) * hd] = 0
        return (x,)

    h = proj.register_forward_pre_hook(hook)
    try:
        return logits(handle)
    finally:
        h.remove()


def test_head_gated_to_zero_equals_zeroed_o_projection_input(handle):
    g = handle.geometry
    layer, head = g.n_layers - 1, g.n_heads - 1
    mask = PruneMask.dense(g).with_head(layer, head, 0.0)
    with gates.apply(handle, mask):
        masked = logits(handle)
    expected = zero_o_input_by_hand(handle, layer, head)
    assert torch.equal(masked, expected)
    assert not torch.allclose(masked, logits(handle), atol=1e-6), "pruning a head must change the output"


def test_dense_mask_leaves_output_unchanged(handle):
    with gates.apply(handle, PruneMask.dense(handle.geometry)):
        assert torch.equal(logits(handle), logits(handle))


def test_ffn_channel_gate_zero_equals_zeroed_down_projection_input(handle):
    g = handle.geometry
    mask = PruneMask.dense(g)
    mask.ffn[0, :5] = 0
    proj = handle.adapter.ffn_output_proj(0)

    def hook(module, args):
        x = args[0].clone()
        x[..., :5] = 0
        return (x,)

    with gates.apply(handle, mask):
        masked = logits(handle)
    h = proj.register_forward_pre_hook(hook)
    try:
        expected = logits(handle)
    finally:
        h.remove()
    assert torch.equal(masked, expected)


def test_removed_sub_blocks_act_as_identity(handle):
    """Removing both sub-blocks of every layer but the last equals feeding embeddings to the last layer."""
    g = handle.geometry
    mask = PruneMask.dense(g)
    mask.attn[0] = 0
    mask.ffn_block[0] = 0
    layer0 = handle.adapter.layers()[0]
    seen = {}

    def grab_in(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def grab_out(module, args, kwargs, out):
        seen["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    h1 = layer0.register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = layer0.register_forward_hook(grab_out, with_kwargs=True)
    try:
        with gates.apply(handle, mask):
            logits(handle)
    finally:
        h1.remove()
        h2.remove()
    assert torch.allclose(seen["in"], seen["out"], atol=1e-6)


def test_soft_gates_receive_gradients(handle):
    g = handle.geometry
    mask = PruneMask.dense(g)
    for name in ("heads", "ffn", "attn", "ffn_block"):
        setattr(mask, name, torch.full_like(getattr(mask, name), 0.7).requires_grad_(True))
    with gates.apply(handle, mask):
        out = token_logits(handle, IDS, MASK)
    out.float().pow(2).mean().backward()
    for name in ("heads", "ffn", "attn", "ffn_block"):
        grad = getattr(mask, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_hooks_are_removed_after_the_context_even_on_exception(handle):
    def count_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())

    before = count_hooks()
    mask = PruneMask.dense(handle.geometry).with_head(0, 0, 0.0).with_block(1, "ffn", 0.0)
    with pytest.raises(RuntimeError, match="boom"):
        with gates.apply(handle, mask):
            assert count_hooks() > before
            raise RuntimeError("boom")
    assert count_hooks() == before
    reference = logits(handle)
    assert torch.equal(reference, logits(handle))


def test_per_sample_masks_match_separate_runs(handle):
    g = handle.geometry
    m0 = PruneMask.dense(g).with_head(0, 1, 0.0)
    m1 = PruneMask.dense(g).with_block(1, "attn", 0.0)
    m1.ffn[0, 3:9] = 0
    with gates.apply(handle, [m0, m1]):
        both = logits(handle)
    with gates.apply(handle, m0):
        first = logits(handle, IDS[:1])
    with gates.apply(handle, m1):
        second = logits(handle, IDS[1:])
    assert torch.allclose(both[0], first[0], atol=1e-5)
    assert torch.allclose(both[1], second[0], atol=1e-5)


def test_per_sample_mask_count_must_match_batch(handle):
    g = handle.geometry
    m = PruneMask.dense(g).with_head(0, 0, 0.0)
    with pytest.raises(ValueError, match="per-sample masks for a batch"):
        with gates.apply(handle, [m, m, m]):
            logits(handle)


def test_masks_in_one_thread_do_not_affect_another(llama_handle):
    handle = llama_handle
    dense = logits(handle)
    mask = PruneMask.dense(handle.geometry).with_block(0, "attn", 0.0)
    inside, started, done = threading.Event(), threading.Event(), {}

    def other_session():
        started.wait()
        done["logits"] = logits(handle)
        inside.set()

    t = threading.Thread(target=other_session)
    t.start()
    with gates.apply(handle, mask):
        started.set()
        inside.wait(timeout=30)
        masked = logits(handle)
    t.join()
    assert torch.equal(done["logits"], dense)
    assert not torch.allclose(masked, dense)


def test_wrong_mask_shape_is_a_clear_error(handle):
    g = handle.geometry
    bad = PruneMask.dense(g)
    bad.heads = torch.ones(g.n_layers, g.n_heads + 1)
    with pytest.raises(MaskError, match=r"mask.heads has shape .* needs"):
        with gates.apply(handle, bad):
            pass


def test_gate_values_outside_unit_interval_are_refused(handle):
    bad = PruneMask.dense(handle.geometry)
    bad.ffn[0, 0] = 1.5
    with pytest.raises(MaskError, match=r"\[0, 1\]"):
        bad.check(handle.geometry)


def test_pruning_everything_is_refused(handle):
    g = handle.geometry
    m = PruneMask.dense(g)
    m.attn[:] = 0
    m.ffn_block[:] = 0
    with pytest.raises(MaskError, match="nothing would be left"):
        m.check(g)


def test_every_head_of_a_layer_pruned_removes_the_attention_sub_block_without_nan(handle):
    g = handle.geometry
    m = PruneMask.dense(g)
    m.heads[0] = 0
    n = m.normalized()
    assert n.attn[0] == 0 and n.attn[1] == 1
    with gates.apply(handle, n):
        out = logits(handle)
    assert torch.isfinite(out).all()
    with gates.apply(handle, m):
        assert torch.isfinite(logits(handle)).all()
