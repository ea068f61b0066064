"""Refitted output projections in a mask: applied per call by hooks, kept by save/load, written by surgery."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.core.refit import LayerRefit
from headlab.engine.export.surgery import prune
from headlab.engine.runtime.sparse_forward import sparse_refusal
from tests.tiny import tiny_handle


def refit_mask(g, seed: int = 0) -> PruneMask:
    """Heads and channels pruned in both layers, random refits and intercept biases on every kept projection."""
    gen = torch.Generator().manual_seed(seed)
    m = PruneMask.dense(g)
    m.heads[0, 1] = 0.0
    m.heads[1, [0, g.n_heads - 1]] = 0.0
    m.ffn[0, ::3] = 0.0
    m.ffn[1, 5:40] = 0.0
    for layer in range(g.n_layers):
        heads, chans = m.kept_units(layer, "attn"), m.kept_units(layer, "ffn")
        m.attn_refit[layer] = LayerRefit(heads, 0.1 * torch.randn(g.hidden, len(heads) * g.head_dim, generator=gen))
        m.ffn_refit[layer] = LayerRefit(chans, 0.1 * torch.randn(g.hidden, len(chans), generator=gen))
    m.attn_bias = 0.01 * torch.randn(g.n_layers, g.hidden, generator=gen)
    m.ffn_bias = 0.01 * torch.randn(g.n_layers, g.hidden, generator=gen)
    return m.check(g)


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma3", "bert"])
def test_masked_refit_model_equals_the_physically_pruned_model(family):
    handle = tiny_handle(family)
    mask = refit_mask(handle.geometry)
    ids, am = _ids()
    with torch.no_grad(), gates.apply(handle, mask):
        ref = token_logits(handle, ids, am)
        plain = token_logits(handle, ids, am)
    with torch.no_grad(), gates.apply(handle, mask.without_refit()):
        unrefit = token_logits(handle, ids, am)
    got = token_logits(prune(handle, mask), ids, am)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(plain, ref)
    assert (ref - unrefit).abs().max() > 1e-3  # the refit really changed what the model computes


def test_refit_hooks_leave_the_shared_model_and_other_threads_alone():
    handle = tiny_handle("llama")
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    ids, am = _ids()
    dense = token_logits(handle, ids, am)
    with gates.apply(handle, refit_mask(handle.geometry)):
        pass
    assert all(torch.equal(before[k], v) for k, v in handle.model.state_dict().items())
    torch.testing.assert_close(token_logits(handle, ids, am), dense, atol=0, rtol=0)


def test_per_sample_masks_apply_each_rows_refit():
    handle = tiny_handle("llama")
    g = handle.geometry
    m = refit_mask(g)
    ids, am = _ids()
    with torch.no_grad():
        with gates.apply(handle, m):
            row0 = token_logits(handle, ids[:1], am[:1])
        with gates.apply(handle, None):
            row1 = token_logits(handle, ids[1:], am[1:])
        with gates.apply(handle, [m, PruneMask.dense(g)]):
            both = token_logits(handle, ids, am)
    torch.testing.assert_close(both, torch.cat([row0, row1]), atol=1e-5, rtol=0)


def test_save_and_load_keep_the_refits(tmp_path):
    g = tiny_handle("llama").geometry
    m = refit_mask(g)
    path = m.save(tmp_path / "mask.json")
    assert (tmp_path / "mask.refit.safetensors").is_file()
    back = PruneMask.load(path, g)
    assert back == m and back.digest() == m.digest()
    assert torch.equal(back.ffn_refit[1].weight, m.ffn_refit[1].weight)


def test_a_mask_file_without_its_refit_file_or_with_another_is_refused(tmp_path):
    g = tiny_handle("llama").geometry
    path = refit_mask(g).save(tmp_path / "a.json")
    refit_mask(g, seed=1).save(tmp_path / "b.json")
    (tmp_path / "b.refit.safetensors").replace(tmp_path / "a.refit.safetensors")
    with pytest.raises(MaskError, match="digest"):
        PruneMask.load(path, g)
    (tmp_path / "a.refit.safetensors").unlink()
    with pytest.raises(MaskError, match="not beside it"):
        PruneMask.load(path, g)
    with pytest.raises(MaskError, match="refit"):
        PruneMask.from_dict(refit_mask(g).to_dict())


def test_refits_enter_the_identity_of_their_layer_only():
    g = tiny_handle("llama").geometry
    m = refit_mask(g)
    other = m.clone()
    w = other.ffn_refit[1].weight.clone()
    w[0, 0] += 1.0
    other.ffn_refit[1] = LayerRefit(other.ffn_refit[1].units, w)
    assert other != m and other.digest() != m.digest()
    assert m.first_changed_layer(other) == 1
    assert m.without_refit().first_changed_layer(m) == 0


def test_editing_a_layer_drops_its_stale_refit_and_check_refuses_one():
    g = tiny_handle("llama").geometry
    m = refit_mask(g)
    edited = m.toggle_head(1, 2)
    assert 1 not in edited.attn_refit and 0 in edited.attn_refit and 1 in edited.ffn_refit
    edited.check(g)
    bad = m.clone()
    bad.heads[0, 2] = 0.0  # edited behind the mask's back
    with pytest.raises(MaskError, match="fitted for units"):
        bad.check(g)


def test_the_kernel_path_refuses_a_refit_mask():
    handle = tiny_handle("llama")
    assert "refit" in sparse_refusal(handle, refit_mask(handle.geometry))
