"""A sparse decode reading its kept channels at 4 bits (headlab.kernels.q4, engine.dynamic.int4_gathered)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headlab.engine.dynamic import dense_generate
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.choosers import ChannelChoice, FixedChooser
from headlab.engine.dynamic.int4 import int4_ffn
from headlab.engine.dynamic.int4_gathered import Int4GatheredFFN, int4_interleaved_ffn, int4_sparse_generate
from headlab.engine.dynamic.sketch import Int4Sketch
from headlab.kernels.q4 import gathered_ffn_q4, pack_levels, pack_q4_ffn, run_gathered_ffn_q4, unpack_levels
from tests.compiled_kernel import compiled_kernel
from tests.tiny import tiny_handle


def _layer(d: int = 64, f: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate, up, down = (Int4Sketch._build(torch.randn(*s, generator=g), pack=False) for s in ((f, d), (f, d), (d, f)))
    packed = pack_q4_ffn(gate.levels, gate.scale, gate.low, up.levels, up.scale, up.low,
                         down.levels, down.scale, down.low)
    return (gate.dequantized(), up.dequantized(), down.dequantized()), packed


def test_levels_pack_two_a_byte_and_unpack_exactly():
    levels = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_levels(levels)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_levels(packed), levels)
    assert int(packed[0, 0]) == int(levels[0, 0]) | int(levels[0, 16]) << 4  # value i and i + 16 share a byte
    with pytest.raises(ValueError, match="group 32"):
        pack_levels(torch.zeros(2, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_levels(torch.full((1, 32), 16))


@pytest.mark.parametrize("given", [False, True])
def test_the_torch_twin_is_the_dequantised_ffn_over_the_kept_channels(given):
    (gate, up, down), (q3, sm, dsm) = _layer()
    x, idx = torch.randn(64), torch.tensor([0, 3, 31, 32, 40, 77, 95])
    gate_act, up_bias = torch.randn(96), torch.randn(96)
    act = gate_act[idx] if given else F.silu(gate[idx] @ x)
    ref = down[:, idx] @ (act * (up[idx] @ x + up_bias[idx]))
    out = gathered_ffn_q4(x, q3, sm, dsm, idx, gate_act=gate_act if given else None, up_bias=up_bias)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    every = gathered_ffn_q4(x, q3, sm, dsm, torch.arange(96))
    assert torch.allclose(every, down @ (F.silu(gate @ x) * (up @ x)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("given", [False, True])
def test_the_compiled_kernel_is_its_torch_twin(given):
    compiled_kernel()
    (_, _, _), (q3, sm, dsm) = _layer(d=96, f=128, seed=1)
    x = torch.randn(96)
    gate_act, gate_bias, up_bias = torch.randn(128), torch.randn(128), torch.randn(128)
    for idx in (torch.arange(128), torch.tensor([5]), torch.tensor([0, 1, 2, 63, 64, 127]),
                torch.tensor([], dtype=torch.long)):
        kw = {"gate_act": gate_act} if given else {"gate_bias": gate_bias}
        ref = gathered_ffn_q4(x, q3, sm, dsm, idx, up_bias=up_bias, **kw)
        out = run_gathered_ffn_q4("compiled", x, q3, sm, dsm, idx, up_bias=up_bias, **kw)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_the_compiled_kernel_refuses_unsorted_or_foreign_indices():
    compiled_kernel()
    _, (q3, sm, dsm) = _layer()
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        run_gathered_ffn_q4("compiled", x, q3, sm, dsm, torch.tensor([3, 1]))
    with pytest.raises(RuntimeError, match="outside"):
        run_gathered_ffn_q4("compiled", x, q3, sm, dsm, torch.tensor([96]))
    with pytest.raises(RuntimeError, match="q3 must be"):
        run_gathered_ffn_q4("compiled", x, q3[:, :-1], sm, dsm, torch.tensor([1]))


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_layer_at_4_bits_over_kept_channels_is_the_int4_layer_masked(llama, backend):
    if backend == "compiled":
        compiled_kernel()
    runner = Int4GatheredFFN(llama, gate_given=False, backend=backend)
    assert runner.path == f"int4 {backend}"
    q = int4_ffn(llama)[1]
    gate, up, down = q.dequantized()
    x = torch.randn(llama.geometry.hidden)
    idx = torch.arange(0, llama.geometry.ffn_dim, 3)
    keep = torch.zeros(llama.geometry.ffn_dim)
    keep[idx] = 1.0
    ref = down @ (keep * q.act(gate @ x) * (up @ x))
    out = runner(1, x, ChannelChoice(idx))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    layout = int4_interleaved_ffn(llama)[1]
    assert int4_interleaved_ffn(llama)[1] is layout  # packed once per model
    # half a byte a weight plus bf16 scales and offsets per 32: 1/8 + 1/16 of the float32 bytes' worth... about
    f32 = 3 * llama.geometry.hidden * llama.geometry.ffn_dim * 4
    assert f32 / 8 < layout.nbytes < f32 / 8 * 1.3


def test_an_int4_sparse_decode_reads_what_the_chooser_keeps(llama):
    g = llama.geometry
    half = [torch.arange(0, g.ffn_dim, 2) for _ in range(g.n_layers)]
    prompt = calibration_ids(llama, window=16, n_windows=1)
    out = int4_sparse_generate(llama, prompt, FixedChooser(llama, half), 6, backend="torch")
    assert out.ffn_path == "int4 torch" and out.new_tokens.numel() == 6
    assert out.kept.shape == (5, g.n_layers) and bool((out.kept == g.ffn_dim // 2).all())
    every = [torch.arange(g.ffn_dim) for _ in range(g.n_layers)]
    full = int4_sparse_generate(llama, prompt, FixedChooser(llama, every), 6, backend="torch")
    dense = dense_generate(llama, prompt, 6)
    # the prefill is the model's own (float32, every channel kept): the same first token and logits
    assert torch.allclose(full.logits[0], dense.logits[0], atol=1e-5) and full.new_tokens[0] == dense.new_tokens[0]
    # the first decoded token reads every channel at 4 bits: near the float32 logits, not equal to them
    moved = (full.logits[1] - dense.logits[1]).abs().max()
    assert 0 < moved < 0.2 * dense.logits[1].abs().max()
