"""The Triton kernels compile for real GPUs, checked without one.

The CPU interpreter runs kernels as numpy and accepts code the GPU compiler rejects
(types, layouts, shared memory), so these tests compile every kernel variant ahead of
time for an sm_90 (H100) target with triton's own compiler and ptxas, in a subprocess
where TRITON_INTERPRET is unset.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
H100_SHARED_MEMORY = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)

# Compiled in a fresh interpreter: our kernel modules must be decorated in compiled mode.
_COMPILE_SCRIPT = r"""
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from headlab.kernels.attention import _head_sparse_attention_kernel, _prune_configs
from headlab.kernels.linear import _col_sparse_linear_kernel, _row_sparse_linear_kernel

TARGET = GPUTarget("cuda", 90, 32)
SIZES = ("H", "GROUP", "T", "M", "N_COLS", "K_IN")  # ints not assumed divisible by 16


def compile_variant(autotuned, pointer_types, constexprs, config):
    fn = autotuned.fn
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "i32")
    # what the launcher's JIT would specialise: 16-byte aligned pointers and strides
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] not in ("constexpr", "fp32") and name not in SIZES}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(src, target=TARGET, options=options)
    return {"shared": kernel.metadata.shared, "wgmma": "warp_group_dot" in kernel.asm["ttgir"]}


# One variant per code path (compiling all of them takes minutes on a small CPU):
# (kernel, dtype, head_dim or None, causal / FULL_WIDTH / COMPACT_INPUT, KEEP_RUN)
VARIANTS = [
    ("attention", torch.float16, 128, True, None),
    ("attention", torch.bfloat16, 64, False, None),
    ("attention", torch.float32, 128, True, None),
    ("row", torch.float16, None, True, 16),
    ("col", torch.float16, None, False, 1),
    ("col", torch.float32, None, True, 16),
]
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

results = []
for kind, dtype, head_dim, flag_value, keep_run in VARIANTS:
    name = NAMES[dtype]
    ptr = "*" + name
    precision = "ieee" if name == "fp32" else "tf32"
    if kind == "attention":
        configs = _prune_configs(_head_sparse_attention_kernel.configs, {"q_ptr": torch.empty(0, dtype=dtype)},
                                 BLOCK_D=head_dim)
        # the biggest tile left after pruning: the one most likely not to fit
        config = max(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
        types = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "out_ptr": ptr, "pairs_ptr": "*i32", "qk_scale": "fp32"}
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "CAUSAL": flag_value,
                      "DOT_PRECISION": precision, "DOT_UPCAST": False}
        kernel = _head_sparse_attention_kernel
    else:
        kernel, flag = {"row": (_row_sparse_linear_kernel, "FULL_WIDTH"),
                        "col": (_col_sparse_linear_kernel, "COMPACT_INPUT")}[kind]
        config = kernel.configs[0]  # the biggest tile
        types = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "keep_ptr": "*i32", "count_ptr": "*i32",
                 "group_ptr": "*i32", "out_ptr": ptr}
        constexprs = {"HAS_BIAS": True, flag: flag_value, "KEEP_RUN": keep_run, "GROUP_M": 8,
                      "DOT_PRECISION": precision, "DOT_UPCAST": False}
    info = compile_variant(kernel, types, constexprs, config)
    results.append({"kernel": kind, "dtype": name, "config": str(config), **info})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled_variants():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this triton cannot compile ahead of time for a CUDA target")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_for_h100_within_shared_memory(compiled_variants):
    assert len(compiled_variants) == 6
    too_big = [v for v in compiled_variants if v["shared"] > H100_SHARED_MEMORY]
    assert not too_big, f"variants over the shared-memory limit: {too_big}"


def test_half_precision_kernels_use_hopper_tensor_cores(compiled_variants):
    half = [v for v in compiled_variants if v["dtype"] in ("fp16", "bf16")]
    assert half and all(v["wgmma"] for v in half), [v for v in half if not v["wgmma"]]
