"""1-/2-bit fake quantisation: the quantisers' values, the straight-through gradient, which modules, the export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.export.surgery import prune
from headlab.engine.recovery.quantize import (
    STE_CLIP,
    QuantizeError,
    export_student,
    fake_quantize,
    load_quantized,
    materialize,
    quantizable_modules,
    quantization_of,
    quantize_rows,
    set_quantization_,
)

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 8, 1, 64]])

# Q/K/V/O + FFN projections per layer, by family (GPT-2 fuses Q/K/V into one c_attn).
PROJECTIONS_PER_LAYER = {"llama": 7, "qwen2": 7, "gemma3": 7, "gpt2": 4, "bert": 6}


def _w(seed: int = 0, shape=(8, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def _logits(handle, ids=IDS):
    with torch.no_grad():
        return token_logits(handle, ids, torch.ones_like(ids))


def test_one_bit_rows_take_exactly_two_values_plus_minus_mean_abs():
    w = _w()
    q = quantize_rows(w, 1).dequantize()
    for row, src in zip(q, w):
        a = src.abs().mean()
        assert torch.unique(row).numel() == 2
        assert torch.allclose(torch.unique(row), torch.stack([-a, a]))
    assert torch.equal(torch.sign(q), torch.where(w >= 0, 1.0, -1.0))


def test_ternary_zeroes_entries_under_the_twn_threshold_and_scales_by_the_kept_mean():
    w = _w(1)
    qw = quantize_rows(w, 2, "ternary")
    delta = 0.7 * w.abs().mean(dim=1, keepdim=True)
    assert torch.equal(qw.codes == 0, w.abs() <= delta)
    kept = w.abs() > delta
    expected = (w.abs() * kept).sum(1) / kept.sum(1)
    assert torch.allclose(qw.scale, expected)
    assert all(torch.unique(r).numel() <= 3 for r in qw.dequantize())


def test_uniform_two_bit_uses_four_symmetric_levels():
    w = _w(2, (4, 256))
    qw = quantize_rows(w, 2, "uniform")
    assert set(qw.codes.unique().tolist()) == {-2, -1, 0, 1}
    levels = qw.dequantize() / qw.scale[:, None]
    assert set(levels.unique().tolist()) == {-1.5, -0.5, 0.5, 1.5}


def test_straight_through_estimator_passes_gradients_inside_the_clip_only():
    w = _w(3).requires_grad_(True)
    with torch.no_grad():
        w[0, 0] = 1.0  # an outlier far beyond STE_CLIP x the row's level
    upstream = torch.randn_like(w)
    (fake_quantize(w, 1) * upstream).sum().backward()
    clip = STE_CLIP * w.detach().abs().mean(dim=1, keepdim=True)
    inside = w.detach().abs() <= clip
    assert torch.equal(w.grad, upstream * inside)
    assert w.grad[0, 0] == 0
    assert inside.float().mean() > 0.8, "most weights must receive the gradient"


@pytest.mark.parametrize("bits,scheme", [(3, None), (0, None), (2, "binary"), (1, "ternary")])
def test_unknown_bit_widths_and_schemes_are_refused(bits, scheme):
    with pytest.raises(QuantizeError):
        quantize_rows(_w(), bits, scheme)


def test_quantisation_covers_exactly_the_qkvo_and_ffn_projections(handle):
    g = handle.geometry
    student = prune(handle, PruneMask.dense(g))
    n = set_quantization_(student.model, 1)
    assert n == PROJECTIONS_PER_LAYER[handle.adapter.family] * g.n_layers
    emb = student.adapter.input_embeddings()
    assert not hasattr(emb, "parametrizations")
    head = student.adapter.lm_head()
    assert head is None or not hasattr(head, "parametrizations")
    for m in quantizable_modules(student.model).values():
        w = m.weight.t() if isinstance(m, Conv1D) else m.weight  # rows = output features
        assert all(torch.unique(r).numel() <= 2 for r in w)
    assert not torch.allclose(_logits(student), _logits(handle), atol=1e-4), "1-bit weights must change the output"


def test_bits_can_go_from_ternary_to_binary_in_place(llama_handle):
    student = prune(llama_handle, PruneMask.dense(llama_handle.geometry))
    set_quantization_(student.model, 2)
    assert quantization_of(student.model) == (2, "ternary")
    set_quantization_(student.model, 1)
    assert quantization_of(student.model) == (1, "binary")
    with pytest.raises(QuantizeError):
        set_quantization_(student.model, None)


def test_materialize_twice_leaves_the_quantised_student_working(llama_handle):
    student = prune(llama_handle, PruneMask.dense(llama_handle.geometry))
    set_quantization_(student.model, 1)
    before = _logits(student)
    a, b = materialize(student.model), materialize(student.model)
    assert not any(hasattr(m, "parametrizations") for m in a.modules())
    assert torch.equal(_logits(student), before)
    with torch.no_grad():
        assert torch.allclose(a(input_ids=IDS).logits, before, atol=1e-5)
        assert torch.allclose(b(input_ids=IDS).logits, before, atol=1e-5)


def _uniform_llama_student(handle):
    g = handle.geometry
    mask = PruneMask.dense(g)
    mask.heads[:, [0, 2]] = 0  # one query head of each KV group: a standard config
    mask.ffn[:, ::2] = 0
    return prune(handle, mask)


@pytest.mark.parametrize("bits", [1, 2])
def test_dequantised_export_reloads_with_plain_transformers_causal_lm(llama_handle, tmp_path, bits):
    student = _uniform_llama_student(llama_handle)
    set_quantization_(student.model, bits)
    folder = export_student(student, tmp_path / "student", manifest={"recipe": "test"})
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        got = plain(input_ids=IDS).logits
    assert torch.allclose(got, _logits(student), atol=1e-5)
    assert (folder / "quantized.safetensors").is_file()


def test_dequantised_export_reloads_with_plain_transformers_encoder(tmp_path):
    from tests.tiny import tiny_handle

    bert = tiny_handle("bert")
    mask = PruneMask.dense(bert.geometry)
    mask.ffn[:, :32] = 0  # channels only: a BERT config can state that
    student = prune(bert, mask)
    set_quantization_(student.model, 1)
    folder = export_student(student, tmp_path / "enc")
    plain = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        got = plain(input_ids=IDS, attention_mask=torch.ones_like(IDS)).last_hidden_state
        want = student.model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_integer_codes_and_scales_rebuild_the_dequantised_weights(llama_handle, tmp_path):
    from safetensors.torch import load_file

    student = _uniform_llama_student(llama_handle)
    set_quantization_(student.model, 1)
    folder = export_student(student, tmp_path / "student")
    raw = load_file(str(folder / "quantized.safetensors"))
    codes = [v for k, v in raw.items() if k.endswith(".codes")]
    assert codes and all(c.dtype == torch.int8 and set(c.unique().tolist()) <= {-1, 1} for c in codes)
    rebuilt = load_quantized(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for key, value in rebuilt.items():
        assert torch.equal(value, reference[key]), key


def test_export_refuses_a_non_empty_folder(llama_handle, tmp_path):
    student = _uniform_llama_student(llama_handle)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_student(student, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_gpt2_conv1d_is_quantised_per_output_feature():
    from tests.tiny import tiny_handle

    gpt2 = tiny_handle("gpt2")
    student = prune(gpt2, PruneMask.dense(gpt2.geometry))
    set_quantization_(student.model, 1)
    w = student.model.transformer.h[0].mlp.c_fc.weight  # (in, out): a column is one output feature
    assert all(torch.unique(col).numel() == 2 for col in w.t())


def test_a_per_layer_student_export_reloads_through_the_engine(tmp_path):
    from headlab.engine.models.load import load_pruned
    from tests.tiny import tiny_handle

    bert = tiny_handle("bert")
    mask = PruneMask.dense(bert.geometry)
    mask.heads[0, :2] = 0  # fewer heads: a BERT config cannot state it, so sizes go per layer
    student = prune(bert, mask)
    set_quantization_(student.model, 2)
    folder = export_student(student, tmp_path / "enc")
    reloaded = load_pruned(folder)
    am = torch.ones_like(IDS)
    with torch.no_grad():
        got = reloaded.model(input_ids=IDS, attention_mask=am).last_hidden_state
        want = student.model(input_ids=IDS, attention_mask=am).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
