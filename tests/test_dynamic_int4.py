"""Native-precision decode: every FFN at 4 bits (headlab.engine.dynamic.int4), on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from headlab.engine.dynamic import IPNChooser, dense_generate
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.decode import decode_weight_bytes
from headlab.engine.dynamic.int4 import (
    INT4_DEQUANTISE,
    INT4_KERNEL,
    int4_decode_weight_bytes,
    int4_ffn,
    int4_generate,
    int4_path,
)
from headlab.engine.dynamic.ipn import untrained_ipn
from headlab.engine.dynamic.sketch import int4_kernel_available
from headlab.engine.models.wrap import wrap_model
from tests.tiny import tiny_handle


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


def _dequantised_twin(handle):
    """A copy of the model whose FFN weights are the float weights the 4-bit layers stand for."""
    model = copy.deepcopy(handle.model)
    twin = wrap_model(model, handle.tokenizer, name=handle.name)
    with torch.no_grad():
        for layer, q in enumerate(int4_ffn(handle)):
            p = twin.adapter.projections(layer)
            for role, w in zip(("gate", "up", "down"), q.dequantized()):
                p[role].weight.copy_(w)
    return twin


def test_int4_dense_decode_matches_the_dequantised_weights(llama):
    """Same tokens and logits (to the kernel's bf16 activations) as the float model with the 4-bit weights."""
    prompt = calibration_ids(llama, window=16, n_windows=1)
    out = int4_generate(llama, prompt, 12)
    ref = dense_generate(_dequantised_twin(llama), prompt, 12)
    assert out.ffn_path == int4_path() and out.ffn_path in (INT4_KERNEL, INT4_DEQUANTISE)
    scale = ref.logits.abs().max()
    assert (out.logits - ref.logits).abs().max() < 0.02 * scale
    assert torch.equal(out.new_tokens[:4], ref.new_tokens[:4])
    fp32 = dense_generate(llama, prompt, 12)  # 4 bits is not float32: the logits move
    assert (fp32.logits - out.logits).abs().max() > (out.logits - ref.logits).abs().max()


def test_the_int4_layer_is_its_dequantised_weights_exactly_without_the_kernel(llama):
    q = int4_ffn(llama)[0]
    x = torch.randn(3, llama.geometry.hidden)
    gate, up, down = q.dequantized()
    ref = (q.act(x @ gate.T) * (x @ up.T)) @ down.T
    got = q.down.matmul(q.act(q.gate.matmul(x, kernel=False)) * q.up.matmul(x, kernel=False), kernel=False)
    assert torch.allclose(got, ref, atol=1e-5)
    if int4_kernel_available():
        assert torch.allclose(q(x), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


def test_int4_layers_are_made_once_per_model(llama):
    assert int4_ffn(llama) is int4_ffn(llama)


def test_int4_bytes_are_five_32nds_of_the_ffns_and_a_sparse_decode_counts_its_predictor(llama):
    g = llama.geometry
    ffn_fp32 = sum(llama.adapter.projections(layer)[r].weight.numel() * 4 for layer in range(g.n_layers)
                   for r in ("gate", "up", "down"))
    dense, int4 = decode_weight_bytes(llama), int4_decode_weight_bytes(llama)
    # 4 bits a weight + a 16-bit scale and offset per group of 32: 5 bits, as Q4_1
    assert dense - int4 == pytest.approx(ffn_fp32 * (1 - 5 / 32), rel=1e-6)
    ids = calibration_ids(llama, window=64, n_windows=2)
    chooser = IPNChooser(llama, untrained_ipn(llama, 0.5, ids))
    everything = torch.full((3, g.n_layers), g.ffn_dim)
    assert int4_decode_weight_bytes(llama, everything, chooser=chooser) == pytest.approx(
        int4 + chooser.predictor_bytes(llama), rel=1e-6)  # nothing dropped: the dense FFN plus the predictor
    half = torch.full((3, g.n_layers), g.ffn_dim // 2)
    sketch_cost = chooser.predictor_bytes(llama)
    saved = int4_decode_weight_bytes(llama, everything, chooser=chooser) - int4_decode_weight_bytes(
        llama, half, chooser=chooser)
    assert saved == pytest.approx((int4 - (dense - ffn_fp32)) / 2, rel=0.02)  # half the 4-bit FFN
    assert sketch_cost > saved  # at 4 bits a 4-bit sketch of gate and up costs more than half the FFN saves



def test_cats_at_4_bits_reads_its_whole_gate_at_4_bits(llama):
    from headlab.engine.dynamic import CatsChooser, calibrate

    g = llama.geometry
    ids = calibration_ids(llama, window=64, n_windows=2)
    cats = CatsChooser(llama, calibrate(llama, "cats", 0.5, ids))
    layers = int4_ffn(llama)
    everything = torch.full((3, g.n_layers), g.ffn_dim)
    assert int4_decode_weight_bytes(llama, everything, chooser=cats) == pytest.approx(int4_decode_weight_bytes(llama))
    half = torch.full((3, g.n_layers), g.ffn_dim // 2)
    saved = int4_decode_weight_bytes(llama) - int4_decode_weight_bytes(llama, half, chooser=cats)
    assert saved == pytest.approx(sum(q.up.nbytes + q.down.nbytes for q in layers) / 2)  # half of up and down
