"""The batch-1 decode FFN kernel: torch twin == dense formula, compiled CPU kernel == twin, Triton (interpreted) == twin."""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of a Triton kernel: triton reads it when decorating
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

from headlab.kernels import compiled, interpreter_enabled, reference, triton_available
from headlab.kernels.decode import gathered_ffn, gathered_ffn_backend
from tests.compiled_kernel import compiled_kernel

REPO = Path(__file__).resolve().parents[1]
# fp32, sums of <= 3 * 96 products of O(1) terms in another order: observed ~1e-6; a wrong channel is O(0.1).
TOL = {"atol": 1e-5, "rtol": 1e-5}
# (hidden d, channels F): d a multiple of the kernel's 16 lanes, and not (the scalar tails)
SHAPES = [(64, 96), (40, 50)]
KEEPS = ["none", "one", "three", "half", "all"]  # "three": fewer than the four channels run in lockstep


def _layer(d: int, n: int, seed: int = 0, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(n, d, generator=gen) / d**0.5, torch.randn(n, d, generator=gen) / d**0.5
    down = torch.randn(d, n, generator=gen) / n**0.5
    biases = [torch.randn(n, generator=gen) if bias else None for _ in range(2)]
    w3 = torch.cat([gate, up, down.t()], dim=1).contiguous()  # (F, 3d)
    return gate, up, down, biases[0], biases[1], w3


def _idx(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    k = {"none": 0, "one": 1, "three": 3, "half": n // 2, "all": n}[kind]
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _dense_formula(x, gate, up, down, gate_bias, up_bias, idx, gate_act=None, act=F.silu):
    """The FFN with every channel computed, then all but idx zeroed at the down input."""
    g = gate @ x + (0 if gate_bias is None else gate_bias)
    u = up @ x + (0 if up_bias is None else up_bias)
    h = (act(g) if gate_act is None else gate_act) * u
    keep = torch.zeros_like(h, dtype=torch.bool)
    keep[idx] = True
    return down @ h.masked_fill(~keep, 0)


@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("given", [False, True], ids=["gate-computed", "gate-given"])
def test_torch_twin_equals_the_dense_ffn_with_dropped_channels_zeroed(d, n, keep, given):
    gate, up, down, gb, ub, w3 = _layer(d, n)
    x, idx = torch.randn(d), _idx(keep, n)
    gate_act = F.silu(gate @ x + gb) if given else None
    expected = _dense_formula(x, gate, up, down, gb, ub, idx, gate_act)
    for rows in (None, 2):  # one block, or blocks of two rows (the scratch reused)
        scratch = None if rows is None else torch.empty(rows * 3 * d)
        got = reference.gathered_ffn(x, w3, idx, gate_act, None if given else gb, ub, None, scratch)
        torch.testing.assert_close(got, expected, **TOL)


def test_torch_twin_runs_any_activation():
    gate, up, down, gb, ub, w3 = _layer(64, 96)
    x, idx = torch.randn(64), _idx("half", 96)
    got = gathered_ffn(x, w3, idx, gate_bias=gb, up_bias=ub, activation=F.gelu)
    torch.testing.assert_close(got, _dense_formula(x, gate, up, down, gb, ub, idx, act=F.gelu), **TOL)
    assert gathered_ffn_backend(x.device, x.dtype, fused_activation=False)[0] == "torch"
    with pytest.raises(ValueError, match="SiLU"):
        gathered_ffn(x, w3, idx, activation=F.gelu, backend="compiled")


@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("given", [False, True], ids=["gate-computed", "gate-given"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_compiled_kernel_equals_the_torch_twin(d, n, keep, given, bias):
    compiled_kernel()
    gate, up, down, gb, ub, w3 = _layer(d, n, bias=bias)
    x, idx = torch.randn(d), _idx(keep, n)
    gate_act = F.silu(gate @ x + (0 if gb is None else gb)) if given else None
    gb_arg = None if given else gb
    got = gathered_ffn(x, w3, idx, gate_act=gate_act, gate_bias=gb_arg, up_bias=ub, backend="compiled")
    twin = gathered_ffn(x, w3, idx, gate_act=gate_act, gate_bias=gb_arg, up_bias=ub, backend="torch")
    torch.testing.assert_close(got, twin, **TOL)
    torch.testing.assert_close(got, _dense_formula(x, gate, up, down, gb, ub, idx, gate_act), **TOL)


def test_compiled_kernel_refuses_bad_inputs_with_a_message():
    module = compiled_kernel()
    _, _, _, _, _, w3 = _layer(64, 96)
    x, out = torch.randn(64), torch.empty(64)
    with pytest.raises(RuntimeError, match="outside"):
        module.gathered_ffn(w3, x, torch.tensor([0, 96]), out)
    with pytest.raises(RuntimeError, match="float32"):
        module.gathered_ffn(w3.double(), x, torch.tensor([0]), out)
    with pytest.raises(RuntimeError, match="int64"):
        module.gathered_ffn(w3, x, torch.tensor([0], dtype=torch.int32), out)
    with pytest.raises(RuntimeError, match="gate_act"):
        module.gathered_ffn(w3, x, torch.tensor([0]), out, torch.randn(5))


def test_auto_picks_the_compiled_kernel_once_built_and_says_why_not_otherwise(monkeypatch):
    compiled_kernel()
    assert gathered_ffn_backend(torch.device("cpu"), torch.float32) == ("compiled", "compiled CPU kernel")
    path, why = gathered_ffn_backend(torch.device("cpu"), torch.float64)
    assert path == "torch" and "float32" in why
    monkeypatch.setattr(compiled, "_LOADED", None)
    monkeypatch.setattr(compiled, "extension_dir", lambda: Path("/nonexistent/headlab"))
    path, why = gathered_ffn_backend(torch.device("cpu"), torch.float32)
    assert path == "torch" and "make setup" in why
    with pytest.raises(compiled.CompiledKernelError, match="make setup"):
        gathered_ffn_backend(torch.device("cpu"), torch.float32, backend="compiled")


def test_the_builder_never_fails_the_setup_without_a_compiler(monkeypatch, capsys):
    monkeypatch.setattr(compiled, "_LOADED", None)
    monkeypatch.setattr(compiled, "missing_build_tools", lambda: "no C++ compiler ('c++' is not on PATH)")
    compiled.main()
    assert "torch fallback" in capsys.readouterr().out


def test_checked_entry_point_rejects_mismatched_inputs():
    _, _, _, gb, _, w3 = _layer(64, 96)
    x = torch.randn(64)
    with pytest.raises(ValueError, match=r"\[F, 3 \* d\]"):
        gathered_ffn(x, w3[:, :100], torch.tensor([0]))
    with pytest.raises(IndexError, match="idx"):
        gathered_ffn(x, w3, torch.tensor([96]))
    with pytest.raises(ValueError, match="gate_bias"):
        gathered_ffn(x, w3, torch.tensor([0]), gate_bias=gb[:5])
    with pytest.raises(ValueError, match="one token"):
        gathered_ffn(x[None], w3, torch.tensor([0]))


def _skip_unless_triton_runs() -> None:
    if not triton_available():
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available() and not interpreter_enabled():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before the kernels are imported")


@pytest.mark.parametrize("d,n", [(64, 96), (40, 50), (200, 40)])  # 200: two BLOCK_D chunks, the last partial
@pytest.mark.parametrize("keep", ["none", "one", "half", "all"])
@pytest.mark.parametrize("given", [False, True], ids=["gate-computed", "gate-given"])
def test_triton_kernel_equals_the_torch_twin(d, n, keep, given):
    _skip_unless_triton_runs()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gate, _, _, gb, ub, w3 = _layer(d, n)
    x, idx = torch.randn(d), _idx(keep, n)
    gate_act = F.silu(gate @ x + gb) if given else None
    gb_arg = None if given else gb
    twin = gathered_ffn(x, w3, idx, gate_act=gate_act, gate_bias=gb_arg, up_bias=ub, backend="torch")
    on = [None if t is None else t.to(device) for t in (x, w3, idx, gate_act, gb_arg, ub)]
    got = gathered_ffn(on[0], on[1], on[2], gate_act=on[3], gate_bias=on[4], up_bias=on[5], backend="triton")
    torch.testing.assert_close(got.cpu(), twin, **TOL)


def test_triton_kernel_in_bf16_stays_close_to_the_fp32_twin():
    _skip_unless_triton_runs()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    *_, gb, ub, w3 = _layer(64, 96)
    x, idx = torch.randn(64), _idx("half", 96)
    twin = gathered_ffn(x, w3, idx, gate_bias=gb, up_bias=ub, backend="torch")
    b = [t.to(device, torch.bfloat16) for t in (x, w3, gb, ub)]
    got = gathered_ffn(b[0], b[1], idx.to(device), gate_bias=b[2], up_bias=b[3], backend="triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), twin, atol=5e-2, rtol=5e-2)  # bf16 inputs: 8-bit mantissas


_COMPILE_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from headlab.kernels.gathered_ffn import BLOCK_D, BLOCK_K, _gathered_ffn_kernel

out = []
for dtype, given in (("fp32", False), ("bf16", True)):
    ptr = "*" + dtype
    types = {"x_ptr": ptr, "w_ptr": ptr, "idx_ptr": "*i32", "act_ptr": ptr, "gate_bias_ptr": ptr, "up_bias_ptr": ptr,
             "out_ptr": "*fp32", "K": "i32", "D": "i32", "stride_w": "i32"}
    constexprs = {"GIVEN": given, "HAS_GATE_BIAS": True, "HAS_UP_BIAS": True, "BLOCK_K": BLOCK_K, "BLOCK_D": BLOCK_D}
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in _gathered_ffn_kernel.arg_names}
    src = ASTSource(fn=_gathered_ffn_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    out.append({"dtype": dtype, "shared": kernel.metadata.shared, "atomics": "atom" in kernel.asm["ptx"]})
print(json.dumps(out))
"""


def test_triton_kernel_compiles_for_h100():
    """The interpreter accepts code the GPU compiler rejects: compile it ahead of time for sm_90, as a GPU would."""
    if not triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this triton cannot compile ahead of time for a CUDA target")
    assert proc.returncode == 0, proc.stderr[-4000:]
    variants = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(variants) == 2 and all(v["atomics"] for v in variants)
