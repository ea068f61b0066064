"""Channel-sparse projections: Triton kernels against their torch twins, twins against dense matmul."""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of a Triton kernel: triton reads it when decorating
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from headlab.kernels import (
    PAD_INDEX,
    col_sparse_linear,
    grouped_col_sparse_linear,
    grouped_row_sparse_linear,
    interpreter_enabled,
    pad_keep_indices,
    reference,
    row_sparse_linear,
    scatter_columns,
    triton_available,
)
from headlab.kernels.backend import resolve_backend
from headlab.kernels.indices import aligned_run_length

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Kernel vs reference, fp32: both accumulate in fp32 and differ only in summation order
# over <= 160 products of O(1) terms (observed ~1e-5); a wrong index is off by O(1).
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}
# bf16 outputs of O(1) (weights scaled by 1/sqrt(K_in)): one rounding of the fp32
# accumulator to an 8-bit mantissa (ulp 2**-7 ~ 8e-3 at 1.0) on each side, plus the
# reference's own bf16 matmul rounding: a few ulps.
BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}
TOLERANCES = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# Reference vs dense matmul (both torch fp32): the same products, gathered.
ORACLE_TOL = {"atol": 1e-5, "rtol": 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _skip_unless_triton_runs(device: str) -> None:
    if not triton_available():
        pytest.skip("triton is not installed")
    if device == "cpu" and not interpreter_enabled():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before the kernels are imported")


def _linear(n_out, n_in, dtype=torch.float32, device="cpu", bias=True, seed=0):
    """x-independent weight [n_out, n_in] scaled so outputs are O(1), and a bias."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    b = torch.randn(n_out, generator=gen) if bias else None
    return weight.to(device, dtype), None if b is None else b.to(device, dtype)


def _x(*shape, dtype=torch.float32, device="cpu", seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _keep(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted keep index over n features: none, one, half, all_but_one, all, or aligned runs of 16."""
    if kind == "runs16":  # whole 16-wide "heads": every other one kept
        return torch.cat([torch.arange(s, s + 16) for s in range(0, n - 15, 32)])
    n_kept = {"none": 0, "one": 1, "half": n // 2, "all_but_one": n - 1, "all": n}[kind]
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_kept].sort().values


def _cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


# ---------------------------------------------------------------- the oracle's oracle


def test_row_sparse_reference_equals_dense_output_columns():
    weight, bias = _linear(24, 20)
    x, keep = _x(3, 5, 20), _keep("half", 24)
    expected = F.linear(x, weight, bias)[..., keep]
    torch.testing.assert_close(reference.row_sparse_linear(x, weight, bias, keep), expected, **ORACLE_TOL)


@pytest.mark.parametrize("compact_input", [False, True])
def test_col_sparse_reference_equals_dense_matmul_with_pruned_inputs_zeroed(compact_input):
    weight, bias = _linear(12, 30)
    x, keep = _x(4, 30), _keep("half", 30)
    mask = torch.zeros(30)
    mask[keep] = 1.0
    expected = F.linear(x * mask, weight, bias)
    x_in = x[..., keep] if compact_input else x
    got = reference.col_sparse_linear(x_in, weight, bias, keep, compact_input)
    torch.testing.assert_close(got, expected, **ORACLE_TOL)


def test_grouped_references_equal_per_sample_dense_results():
    w_up, b_up = _linear(24, 20)
    w_down, b_down = _linear(20, 24, seed=2)
    keeps = [_keep("half", 24), _keep("none", 24), _keep("all", 24)]
    group_ids = torch.tensor([2, 0, 1, 0])
    x = _x(4, 3, 20)
    padded = pad_keep_indices(keeps)
    up = reference.grouped_row_sparse_linear(x, w_up, b_up, padded, group_ids)
    up_full = reference.grouped_row_sparse_linear(x, w_up, b_up, padded, group_ids, full_width=True)
    down = reference.grouped_col_sparse_linear(up, w_down, b_down, padded, group_ids, compact_input=True)
    for b, g in enumerate(group_ids.tolist()):
        mask = torch.zeros(24)
        mask[keeps[g]] = 1.0
        dense_up = F.linear(x[b], w_up, b_up) * mask  # pruned channels zeroed
        n = keeps[g].numel()
        torch.testing.assert_close(up[b, :, :n], dense_up[:, keeps[g]], **ORACLE_TOL)
        assert torch.equal(up[b, :, n:], torch.zeros_like(up[b, :, n:])), "padding columns must be zero"
        torch.testing.assert_close(up_full[b], dense_up, **ORACLE_TOL)
        torch.testing.assert_close(down[b], F.linear(dense_up, w_down, b_down), **ORACLE_TOL)


# ---------------------------------------------------------------- kernels vs reference

# (leading shape of x, in_features, out_features, keep kind). Rows and features straddle
# the 32-wide interpreter blocks (and 16..256 on GPU); keep kinds hit the empty index,
# a single feature, half, all-but-one, all, and aligned 16-wide runs (vectorised path).
ROW_CASES = [
    ((2, 37), 48, 70, "half"),
    ((45,), 40, 33, "all_but_one"),
    ((1, 3), 64, 64, "none"),
    ((2, 20), 70, 96, "runs16"),
    ((33,), 16, 5, "one"),
    ((2, 2, 9), 32, 48, "all"),
]


@pytest.mark.parametrize("device", DEVICES)
@DTYPES
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: f"x{c[0]}-in{c[1]}-out{c[2]}-{c[3]}")
def test_row_sparse_kernel_matches_reference(device, dtype, has_bias, case):
    _skip_unless_triton_runs(device)
    lead, n_in, n_out, kind = case
    weight, bias = _linear(n_out, n_in, dtype, device, bias=has_bias)
    x, keep = _x(*lead, n_in, dtype=dtype, device=device), _keep(kind, n_out)
    got = row_sparse_linear(x, weight, bias, keep.to(device), backend="triton")
    expected = reference.row_sparse_linear(*_cpu(x, weight, bias), keep)
    assert got.shape == (*lead, keep.numel()) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@DTYPES
@pytest.mark.parametrize("compact_input", [False, True], ids=["full_x", "compact_x"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: f"x{c[0]}-in{c[2]}-out{c[1]}-{c[3]}")
def test_col_sparse_kernel_matches_reference(device, dtype, compact_input, case):
    _skip_unless_triton_runs(device)
    lead, n_out, n_in, kind = case  # the row cases transposed: keep indexes the inputs
    weight, bias = _linear(n_out, n_in, dtype, device)
    keep = _keep(kind, n_in)
    x = _x(*lead, keep.numel() if compact_input else n_in, dtype=dtype, device=device)
    got = col_sparse_linear(x, weight, bias, keep.to(device), compact_input=compact_input, backend="triton")
    expected = reference.col_sparse_linear(*_cpu(x, weight, bias), keep, compact_input)
    assert got.shape == (*lead, n_out) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])


def _group_keeps(n: int) -> list[torch.Tensor]:
    """Masks a router could produce: half, none, all-but-one, and aligned runs."""
    return [_keep("half", n), _keep("none", n), _keep("all_but_one", n, seed=3), _keep("runs16", n)]


@pytest.mark.parametrize("device", DEVICES)
@DTYPES
@pytest.mark.parametrize("full_width", [False, True], ids=["compact_out", "full_out"])
@pytest.mark.parametrize("group_ids", [[3, 0, 2, 0, 1], [1, 1]], ids=["mixed", "one_group"])
def test_grouped_row_sparse_kernel_matches_reference(device, dtype, full_width, group_ids):
    _skip_unless_triton_runs(device)
    n_in, n_out, T = 40, 64, 19
    weight, bias = _linear(n_out, n_in, dtype, device)
    keep = pad_keep_indices(_group_keeps(n_out))
    ids = torch.tensor(group_ids)
    x = _x(len(group_ids), T, n_in, dtype=dtype, device=device)
    got = grouped_row_sparse_linear(
        x, weight, bias, keep.to(device), ids.to(device), full_width=full_width, backend="triton"
    )
    expected = reference.grouped_row_sparse_linear(*_cpu(x, weight, bias), keep, ids, full_width)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@DTYPES
@pytest.mark.parametrize("compact_input", [False, True], ids=["full_x", "compact_x"])
def test_grouped_col_sparse_kernel_matches_reference(device, dtype, compact_input):
    _skip_unless_triton_runs(device)
    n_in, n_out, T = 64, 36, 21
    weight, bias = _linear(n_out, n_in, dtype, device)
    keep = pad_keep_indices(_group_keeps(n_in))
    ids = torch.tensor([3, 0, 2, 0, 1])
    x = _x(5, T, keep.shape[1] if compact_input else n_in, dtype=dtype, device=device)
    got = grouped_col_sparse_linear(
        x, weight, bias, keep.to(device), ids.to(device), compact_input=compact_input, backend="triton"
    )
    expected = reference.grouped_col_sparse_linear(*_cpu(x, weight, bias), keep, ids, compact_input)
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])


def _gpu_tiles() -> list[tuple[int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of every config in the GPU autotuning space."""
    if not triton_available():
        return []
    from headlab.kernels.linear import _configs

    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in _configs(interpreted=False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", _gpu_tiles(), ids=lambda t: "M{}xN{}xK{}".format(*t))
def test_kernels_are_exact_with_every_gpu_tile_shape(device, tile, monkeypatch):
    _skip_unless_triton_runs(device)
    import triton

    from headlab.kernels import linear

    block_m, block_n, block_k = tile
    # a single config runs as given: no benchmarking, no cached choice from earlier calls
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=2)
    monkeypatch.setattr(linear._row_sparse_linear_kernel, "configs", [config])
    monkeypatch.setattr(linear._col_sparse_linear_kernel, "configs", [config])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # fp32 tiles this big overflow GPU shared memory
    n_in, n_out, T = 72, 136, 40  # more than one block and a ragged tail for most tiles
    w_up, b_up = _linear(n_out, n_in, dtype, device)
    w_down, b_down = _linear(n_in, n_out, dtype, device, seed=2)
    keep = pad_keep_indices(_group_keeps(n_out))
    ids = torch.tensor([3, 0])  # one group keeping aligned 16-wide runs, one scattered channels
    x = _x(2, T, n_in, dtype=dtype, device=device)
    x_cpu, w_up_cpu, b_up_cpu, w_down_cpu, b_down_cpu = _cpu(x, w_up, b_up, w_down, b_down)
    for full_width in (False, True):
        got = grouped_row_sparse_linear(
            x, w_up, b_up, keep.to(device), ids.to(device), full_width=full_width, backend="triton"
        )
        expected = reference.grouped_row_sparse_linear(x_cpu, w_up_cpu, b_up_cpu, keep, ids, full_width)
        torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])
        h = got  # compact (Kmax wide) on the first pass, full width on the second
        got = grouped_col_sparse_linear(
            h, w_down, b_down, keep.to(device), ids.to(device), compact_input=not full_width, backend="triton"
        )
        expected = reference.grouped_col_sparse_linear(h.cpu(), w_down_cpu, b_down_cpu, keep, ids, not full_width)
        torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_ffn_from_kernels_equals_dense_ffn_with_channels_zeroed(device):
    _skip_unless_triton_runs(device)
    d, f, T = 32, 80, 13
    w_gate, _ = _linear(f, d, device=device, bias=False, seed=4)
    w_up, _ = _linear(f, d, device=device, bias=False, seed=5)
    w_down, _ = _linear(d, f, device=device, bias=False, seed=6)
    x, keep = _x(2, T, d, device=device), _keep("half", f).to(device)
    h = F.silu(row_sparse_linear(x, w_gate, None, keep, backend="triton"))
    h = h * row_sparse_linear(x, w_up, None, keep, backend="triton")  # (2, T, len(keep))
    got = col_sparse_linear(h, w_down, None, keep, compact_input=True, backend="triton")
    mask = torch.zeros(f, device=device)
    mask[keep] = 1.0
    dense = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up) * mask, w_down)
    torch.testing.assert_close(got, dense, **FP32_TOL)


# ---------------------------------------------------------------- helpers and dispatch


def test_scatter_columns_puts_compact_values_back_with_zeros_elsewhere():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = scatter_columns(y, torch.tensor([3, 0]), width=5)
    assert torch.equal(out, torch.tensor([[2.0, 0, 0, 1.0, 0], [4.0, 0, 0, 3.0, 0]]))


def test_pad_keep_indices_from_masks_and_lists_right_pads_with_minus_one():
    from_mask = pad_keep_indices(torch.tensor([[True, False, True], [False, False, False]]))
    from_list = pad_keep_indices([torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)])
    expected = torch.tensor([[0, 2], [PAD_INDEX, PAD_INDEX]])
    assert torch.equal(from_mask, expected) and torch.equal(from_list, expected)


def test_aligned_run_length_detects_whole_heads_and_rejects_scattered_channels():
    heads = pad_keep_indices([torch.arange(16, 48), torch.arange(64, 80)])
    counts = (heads != PAD_INDEX).sum(1)
    assert aligned_run_length(heads, counts) == 16
    scattered = torch.tensor([[0, 1, 2, 5]])
    assert aligned_run_length(scattered, torch.tensor([4])) == 1
    shifted = torch.arange(8, 24)[None]  # consecutive but not aligned to 16
    assert aligned_run_length(shifted, torch.tensor([16])) == 8


def test_auto_backend_is_torch_on_cpu_and_triton_needs_cuda_or_the_interpreter(monkeypatch):
    x = torch.randn(2, 3)
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if triton_available():
        with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
            resolve_backend("triton", x)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", x)


def test_bool_keep_mask_selects_the_same_features_as_its_indices():
    weight, bias = _linear(6, 4)
    x = _x(3, 4)
    mask = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(
        row_sparse_linear(x, weight, bias, mask), row_sparse_linear(x, weight, bias, mask.nonzero().squeeze(1))
    )


# ---------------------------------------------------------------- clear errors


def test_keep_index_out_of_range_is_refused():
    weight, bias = _linear(6, 4)
    with pytest.raises(ValueError, match=r"keep_idx out of range: values must lie in \[0, 6\)"):
        row_sparse_linear(_x(2, 4), weight, bias, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="out of range"):
        col_sparse_linear(_x(2, 4), weight, bias, torch.tensor([-1]))


def test_keep_index_of_wrong_shape_or_type_is_refused():
    weight, bias = _linear(6, 4)
    with pytest.raises(ValueError, match="keep_idx must be 1-D"):
        row_sparse_linear(_x(2, 4), weight, bias, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="bool keep mask has 3 entries for 6 features"):
        row_sparse_linear(_x(2, 4), weight, bias, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="integer indices or bools"):
        row_sparse_linear(_x(2, 4), weight, bias, torch.tensor([0.0, 1.0]))


def test_feature_and_bias_shape_mismatches_are_refused():
    weight, bias = _linear(6, 4)
    with pytest.raises(ValueError, match="x has 5 features but weight expects 4"):
        row_sparse_linear(_x(2, 5), weight, bias, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        row_sparse_linear(_x(2, 4), weight, bias[:3], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"len\(keep_idx\) \(compact_input=True\) is 2"):
        col_sparse_linear(_x(2, 3), _linear(6, 4)[0], None, torch.tensor([0, 1]), compact_input=True)
    with pytest.raises(TypeError, match="dtype"):
        row_sparse_linear(_x(2, 4, dtype=torch.bfloat16), weight, bias, torch.tensor([0]))


def test_bad_groups_are_refused():
    weight, bias = _linear(6, 4)
    keep = pad_keep_indices([torch.tensor([0, 1]), torch.tensor([2])])
    x = _x(3, 2, 4)
    with pytest.raises(ValueError, match=r"group_ids out of range: values must lie in \[0, 2\)"):
        grouped_row_sparse_linear(x, weight, bias, keep, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"group_ids must have shape \(3,\)"):
        grouped_row_sparse_linear(x, weight, bias, keep, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="padding .* must only trail"):
        grouped_row_sparse_linear(x, weight, bias, torch.tensor([[PAD_INDEX, 1]]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="group_keep_idx out of range"):
        grouped_col_sparse_linear(x, weight, bias, torch.tensor([[0, 4]]), torch.tensor([0, 0, 0]))
