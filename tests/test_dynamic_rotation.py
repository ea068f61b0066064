"""The rotated weight sketch (headlab.engine.dynamic.rotation): outputs unchanged, off the weights' own 4-bit grid."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from headlab.engine.dynamic import calibration_ids
from headlab.engine.dynamic.ipn import IPN, IPNError, layer_sketches, load_ipn, save_ipn, untrained_ipn
from headlab.engine.dynamic.ipn.store import META_FILE
from headlab.engine.dynamic.rotation import input_rotation, sketch_errors, sketch_relative_error
from headlab.engine.dynamic.sketch import GROUP
from tests.tiny import tiny_handle


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.mark.parametrize("d", [64, 96, 576])  # Hadamard (a power of two), random rotations otherwise
def test_the_rotation_is_orthogonal_and_seeded(d):
    r = input_rotation(d)
    torch.testing.assert_close(r @ r.T, torch.eye(d), rtol=0, atol=2e-6)
    assert torch.equal(r, input_rotation(d))
    assert not torch.equal(r, input_rotation(d, seed=1))


@pytest.mark.parametrize("d", [64, 96])
def test_rotating_the_ffn_input_space_leaves_its_output_unchanged(d):
    """x' = x R, W' = W R for gate and up: down(act(x' W_g'^T) * x' W_u'^T) equals the FFN's output."""
    torch.manual_seed(0)
    f = 3 * d
    w_gate, w_up, w_down = torch.randn(f, d) / d ** 0.5, torch.randn(f, d) / d ** 0.5, torch.randn(d, f) / f ** 0.5
    x = torch.randn(4, 7, d, dtype=torch.float64)
    w_gate, w_up, w_down = (w.double() for w in (w_gate, w_up, w_down))
    ref = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    r = input_rotation(d).double()
    xr = x @ r
    out = (F.silu(xr @ (w_gate @ r).T) * (xr @ (w_up @ r).T)) @ w_down.T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # R is float32-orthogonal: float32-level agreement
    assert not torch.allclose(xr, x, atol=1e-3)  # the inputs did move


def test_the_rotated_product_estimates_the_same_layer_output(llama):
    x = torch.randn(5, llama.geometry.hidden)
    p = llama.adapter.projections(0)
    exact = x @ torch.cat([p["gate"].weight, p["up"].weight]).detach().T
    for kind in ("aligned", "rotated"):
        est = layer_sketches(llama, kind)[0].product(x)
        assert float((est - exact).norm() / exact.norm()) < 0.15, kind  # a 4-bit estimate of the same product
    assert layer_sketches(llama, "rotated")[0].rotation is not None
    assert layer_sketches(llama, "aligned")[0].rotation is None
    with pytest.raises(IPNError, match="unknown sketch"):
        layer_sketches(llama, "diagonal")


def _on_a_4bit_grid(n: int, k: int) -> torch.Tensor:
    """A weight whose every group of GROUP inputs is levels * scale + low (0..15), scale and low exact in bf16."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=gen).float()
    levels[..., 0], levels[..., 1] = 0.0, 15.0  # every group spans the whole grid, as a quantiser's output does
    scale = (torch.rand(n, k // GROUP, 1, generator=gen) * 0.01 + 0.001).bfloat16().float()
    low = (-7.5 * scale).bfloat16().float()
    return (levels * scale + low).view(n, k)


def test_a_rotated_sketch_cannot_sit_on_the_weights_own_4bit_grid():
    w = _on_a_4bit_grid(128, 256)
    aligned = sketch_relative_error(w)
    rotated = sketch_relative_error(w, input_rotation(256))
    assert aligned < 1e-3  # the aligned sketch reproduces a natively 4-bit weight almost exactly
    assert rotated > 0.03 and rotated > 30 * aligned  # rotated, it is an honest 4-bit copy
    gaussian = sketch_relative_error(torch.randn(128, 256))
    assert 0.5 * gaussian < rotated < 2 * gaussian  # about what any 4-bit sketch of an unstructured weight costs


def test_sketch_errors_reports_both_ways_for_a_model(llama):
    errors = sketch_errors(llama)
    assert set(errors) == {"aligned", "rotated"}
    assert all(0.01 < e < 0.2 for e in errors.values())  # random tiny weights: no grid for either to sit on


def test_the_sketch_kind_is_saved_and_counted(llama, tmp_path):
    ids = calibration_ids(llama, window=64, n_windows=4)
    rotated = untrained_ipn(llama, 0.5, ids)
    aligned = untrained_ipn(llama, 0.5, ids, sketch="aligned")
    assert rotated.sketch == "rotated" and aligned.sketch == "aligned"
    d = llama.geometry.hidden
    assert rotated.predictor_bytes == aligned.predictor_bytes + d * d * 4  # one shared R, read per token
    folder = save_ipn(llama, rotated, tmp_path / "rotated")
    loaded = load_ipn(llama, folder)
    x = torch.randn(2, 3, d)
    assert loaded.sketch == "rotated"
    for layer in range(llama.geometry.n_layers):
        assert torch.equal(loaded.channel_keep(layer, x), rotated.channel_keep(layer, x))
    record = json.loads((folder / META_FILE).read_text())
    del record["config"]["sketch"]  # a network saved before rotated sketches existed was trained on aligned ones
    (folder / META_FILE).write_text(json.dumps(record))
    assert load_ipn(llama, folder).sketch == "aligned"
    with pytest.raises(IPNError, match="unknown sketch"):
        IPN.for_model(llama, sketch="diagonal")


def test_the_weight_grid_tells_a_natively_4bit_model_from_a_float_one():
    """Measured from the weights: gate/up snapped to 16 values per group of 32 are native 4-bit; random ones are not."""
    import dataclasses

    from headlab.engine.dynamic.rotation import distinct_per_group, weight_grid

    handle = tiny_handle("llama")
    assert weight_grid(handle).on_grid < 0.01 and weight_grid(handle).note() is None  # a float model: no note
    with torch.no_grad():
        for layer in range(handle.geometry.n_layers):
            for role in ("gate", "up"):
                w = handle.adapter.projections(layer)[role].weight
                w.copy_(_on_a_4bit_grid(*w.shape))
    assert int(distinct_per_group(handle.adapter.projections(0)["gate"].weight).max()) == 16
    grid = weight_grid(handle)
    assert grid.native_4bit and grid.on_grid == 1.0 and grid.max_distinct == 16
    note = grid.note()
    assert "natively 4-bit" in note and "own grid" in note and "rotated" in note and "dequantised" not in note
    shipped = weight_grid(dataclasses.replace(handle, name="smollm2-135m-instruct")).note()
    assert "dequantised from SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1)" in shipped
    gemma_like = weight_grid(dataclasses.replace(tiny_handle("llama"), name="gemma3-270m")).note()
    assert "gemma-3-270m-q4_k_m.gguf (Q4_K_M)" in gemma_like and "not on a 4-bit grid" in gemma_like
