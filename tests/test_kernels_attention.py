"""Head-sparse attention: the Triton kernel against its torch twin, and the twin against dense SDPA."""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of a Triton kernel: triton reads it when decorating
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from headlab.kernels import head_sparse_attention, interpreter_enabled, reference, triton_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Kernel vs reference, fp32: the blocked online softmax sums in another order than one
# softmax; errors are ~1e-6 at these sizes, and a wrong mask, scale or KV head is off by
# more than 1e-1, so 1e-4 leaves margin without hiding bugs.
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}
# bf16 has an 8-bit mantissa (ulp 2**-7 ~ 8e-3 at 1.0) and the kernel rounds the softmax
# weights to bf16 before P @ V, as FlashAttention does, where SDPA rounds elsewhere:
# allow a few ulps of outputs that are averages of O(1) values.
BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}
TOLERANCES = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# Reference vs dense SDPA (both torch, fp32): same math on gathered heads.
ORACLE_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _skip_unless_triton_runs(device: str) -> None:
    if not triton_available():
        pytest.skip("triton is not installed")
    if device == "cpu" and not interpreter_enabled():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before the kernels are imported")


def _inputs(B, H, Hkv, T, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (H, Hkv, Hkv))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _head_keep(kind: str, B: int, H: int, per_sample: bool, seed: int = 0) -> torch.Tensor:
    """[B, H] (per_sample) or [H] keep mask with the given share of kept heads."""
    n_kept = {"none": 0, "one": 1, "half": H // 2, "all_but_one": H - 1, "all": H}[kind]
    gen = torch.Generator().manual_seed(seed)
    rows = B if per_sample else 1
    keep = torch.zeros(rows, H, dtype=torch.bool)
    for row in keep:  # a different random set of kept heads per sample
        row[torch.randperm(H, generator=gen)[:n_kept]] = True
    return keep if per_sample else keep[0]


def _dense_masked(q, k, v, keep, causal, scale=None):
    """The oracle's oracle: dense SDPA over all heads, pruned heads' outputs zeroed."""
    B, H = q.shape[:2]
    group = H // k.shape[1]
    k_full = k.repeat_interleave(group, dim=1)  # (B, H, T, D): head h reads KV head h // group
    v_full = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k_full, v_full, is_causal=causal, scale=scale)
    return out * keep.expand(B, H)[:, :, None, None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("kind", ["none", "half", "all"])
def test_reference_equals_dense_sdpa_with_pruned_heads_zeroed(device, group, causal, per_sample, kind):
    B, Hkv, T, D = 2, 2, 23, 16
    H = Hkv * group
    q, k, v = _inputs(B, H, Hkv, T, D, torch.float32, device)
    keep = _head_keep(kind, B, H, per_sample).to(device)
    expected = _dense_masked(q, k, v, keep, causal)
    got = reference.head_sparse_attention(q, k, v, keep.expand(B, H), causal, None)
    torch.testing.assert_close(got, expected, **ORACLE_TOL)


# (B, H, Hkv, T, head_dim, kept share, per-sample mask). Together they hit: head_dim 64 and
# 128; T below, above, equal to and not a multiple of the block (32 under the interpreter,
# 64/128 on GPU); T == 1; GQA groups 1, 3, 8; 0%, one head, 50%, all-but-one and 100% kept.
ATTENTION_CASES = [
    (2, 6, 6, 37, 64, "half", False),
    (2, 6, 2, 37, 64, "half", True),
    (1, 8, 1, 45, 128, "all_but_one", False),
    (2, 8, 1, 33, 64, "half", True),
    (2, 3, 1, 64, 128, "all_but_one", True),
    (2, 4, 4, 20, 64, "none", False),
    (1, 3, 1, 70, 64, "one", False),
    (2, 2, 2, 1, 64, "all", True),
    (1, 4, 2, 29, 128, "all", False),
]


def _case_id(case) -> str:
    B, H, Hkv, T, D, kind, per_sample = case
    return f"B{B}H{H}Hkv{Hkv}T{T}D{D}-{kind}-{'per_sample' if per_sample else 'shared'}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_case_id)
def test_kernel_matches_reference_and_zeroes_pruned_heads(device, dtype, causal, case):
    _skip_unless_triton_runs(device)
    B, H, Hkv, T, D, kind, per_sample = case
    q, k, v = _inputs(B, H, Hkv, T, D, dtype, device)
    keep = _head_keep(kind, B, H, per_sample)
    got = head_sparse_attention(q, k, v, keep.to(device), causal=causal, backend="triton")
    # the CPU reference is the oracle on every device (CUDA SDPA may use TF32 internally)
    cpu = [t.cpu() for t in (q, k, v)]
    expected = reference.head_sparse_attention(*cpu, keep.expand(B, H), causal, None)
    assert got.shape == (B, H, T, D) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])
    pruned = ~keep.expand(B, H).to(device)
    assert torch.equal(got[pruned], torch.zeros_like(got[pruned])), "pruned heads must be exact zeros"


def _gpu_tiles() -> list[tuple[int, int]]:
    """(BLOCK_M, BLOCK_N) pairs the GPU autotuner may pick (after its pruning), for any dtype."""
    if not triton_available():
        return []
    from headlab.kernels.attention import _configs, _prune_configs

    configs = _prune_configs(_configs(interpreted=False), {"q_ptr": torch.empty(0, dtype=torch.bfloat16)}, BLOCK_D=64)
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tile", _gpu_tiles(), ids=lambda t: f"M{t[0]}xN{t[1]}")
def test_kernel_is_exact_with_every_gpu_tile_shape(device, causal, tile, monkeypatch):
    _skip_unless_triton_runs(device)
    import triton

    from headlab.kernels import attention

    block_m, block_n = tile
    # a single config runs as given: no benchmarking, no cached choice from earlier calls
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=8 if block_m == 128 else 4, num_stages=2)
    monkeypatch.setattr(attention._head_sparse_attention_kernel, "configs", [config])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # fp32 tiles this big overflow GPU shared memory
    B, H, Hkv, T, D = 2, 4, 2, 150, 64  # T straddles every block size; KV blocks < and == query blocks
    q, k, v = _inputs(B, H, Hkv, T, D, dtype, device)
    keep = _head_keep("half", B, H, per_sample=True)
    got = head_sparse_attention(q, k, v, keep.to(device), causal=causal, backend="triton")
    expected = reference.head_sparse_attention(*(t.cpu() for t in (q, k, v)), keep, causal, None)
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_merged_heads_layout_is_transposed_output(device):
    _skip_unless_triton_runs(device)
    B, H, Hkv, T, D = 2, 6, 2, 19, 64
    q, k, v = _inputs(B, H, Hkv, T, D, torch.float32, device)
    keep = _head_keep("half", B, H, per_sample=True).to(device)
    merged = head_sparse_attention(q, k, v, keep, backend="triton", merge_heads=True)
    bhtd = head_sparse_attention(q, k, v, keep, backend="torch")
    assert merged.shape == (B, T, H * D)
    torch.testing.assert_close(merged, bhtd.transpose(1, 2).reshape(B, T, H * D), **FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_reads_strided_heads_of_a_bthd_projection(device):
    _skip_unless_triton_runs(device)
    B, H, Hkv, T, D = 2, 4, 2, 21, 64
    gen = torch.Generator().manual_seed(1)
    # q/k/v as views of [B, T, heads, D] projections: what a model has before transposing
    q = torch.randn(B, T, H, D, generator=gen).to(device).transpose(1, 2)  # (B, H, T, D) strided
    k = torch.randn(B, T, Hkv, D, generator=gen).to(device).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=gen).to(device).transpose(1, 2)
    keep = torch.tensor([True, False, True, True], device=device)
    got = head_sparse_attention(q, k, v, keep, scale=0.3, backend="triton")
    expected = head_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), keep, scale=0.3, backend="torch")
    torch.testing.assert_close(got, expected, **FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_backend_on_inputs_requiring_grad_is_differentiable(device):
    B, H, Hkv, T, D = 1, 4, 2, 9, 16
    q, k, v = _inputs(B, H, Hkv, T, D, torch.float32, device)
    q.requires_grad_(True)
    keep = torch.tensor([True, False, True, False], device=device)
    head_sparse_attention(q, k, v, keep).sum().backward()
    assert torch.equal(q.grad[:, ~keep], torch.zeros_like(q.grad[:, ~keep]))
    assert q.grad[:, keep].abs().sum() > 0


def test_forced_triton_refuses_inputs_that_need_grad():
    q, k, v = _inputs(1, 2, 1, 4, 16, torch.float32, "cpu")
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        head_sparse_attention(q, k, v, torch.ones(2, dtype=torch.bool), backend="triton")


def test_head_keep_of_wrong_shape_is_refused():
    q, k, v = _inputs(2, 4, 2, 5, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"head_keep must have shape \[H\]"):
        head_sparse_attention(q, k, v, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"head_keep must have shape"):
        head_sparse_attention(q, k, v, torch.ones(4, 2, dtype=torch.bool))


def test_head_keep_that_is_not_bool_is_refused():
    q, k, v = _inputs(2, 4, 2, 5, 16, torch.float32, "cpu")
    with pytest.raises(TypeError, match="bool mask"):
        head_sparse_attention(q, k, v, torch.ones(4))


def test_query_heads_not_a_multiple_of_kv_heads_are_refused():
    q, k, v = _inputs(1, 6, 4, 5, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        head_sparse_attention(q, k, v, torch.ones(6, dtype=torch.bool))


def test_kv_of_other_length_or_head_dim_is_refused():
    q, _, _ = _inputs(1, 4, 2, 5, 16, torch.float32, "cpu")
    k, v = _inputs(1, 2, 2, 6, 16, torch.float32, "cpu")[1:]
    with pytest.raises(ValueError, match="must match q"):
        head_sparse_attention(q, k, v, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be 4-D"):
        head_sparse_attention(q[0], k, v, torch.ones(4, dtype=torch.bool))


def test_mixed_dtypes_are_refused():
    q, k, v = _inputs(1, 2, 1, 5, 16, torch.float32, "cpu")
    with pytest.raises(TypeError, match="dtype"):
        head_sparse_attention(q, k.half(), v, torch.ones(2, dtype=torch.bool))


def test_unknown_backend_is_refused():
    q, k, v = _inputs(1, 2, 1, 5, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        head_sparse_attention(q, k, v, torch.ones(2, dtype=torch.bool), backend="cuda")
