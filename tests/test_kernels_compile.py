"""The Triton kernels compile for an H100 (sm_90) ahead of time, with no GPU present: catches what the
interpreter cannot (types, constexpr control flow, shared-memory budget) on CPU-only CI. Runs in a
subprocess because the interpreter tests set TRITON_INTERPRET=1 in the test process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_SHARED_BYTES = 232448  # max dynamic shared memory per block on sm_90


def _compile(fn, pointers, floats, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "fp32" if name in floats else "i32")
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    assert kernel.metadata.shared <= H100_SHARED_BYTES, (fn.arg_names[0], kernel.metadata.shared)
    assert kernel.asm.get("ptx"), "no PTX produced"
    return kernel


def compile_all():
    """bf16, head_dim 128, the GPU tile configs of dist.kernels (forward, backward, decode)."""
    import torch

    from dist.kernels import triton_attention as ta
    from dist.kernels import triton_decode as td

    class _Cuda:  # what _config looks at
        device = torch.device("cuda")
        dtype = torch.bfloat16
        shape = (1, 1, 1, 128)

    cfg = ta._config(_Cuda)
    P, F32 = "*bf16", "*fp32"
    io = dict(Q=P, K=P, V=P, O=P, DO=P, DQ=P, DK=P, DV=P, LSE=F32, DELTA=F32, CU_Q="*i32", CU_K="*i32")
    base = dict(BLOCK_D=128, DOT_PREC="tf32", DOT_F32=False)
    bm, bn, warps, stages = cfg["fwd"]
    for causal, varlen in ((True, True), (False, False)):
        _compile(ta._fwd_kernel, io, {"scale_log2"},
                 dict(base, CAUSAL=causal, VARLEN=varlen, BLOCK_M=bm, BLOCK_N=bn), warps, stages)
    bm, bn, warps, stages = cfg["bwd"]
    _compile(ta._bwd_preprocess, io, set(), dict(BLOCK_M=bm, BLOCK_D=128), warps, 1)
    for kernel in (ta._bwd_dkdv_kernel, ta._bwd_dq_kernel):
        _compile(kernel, io, {"scale", "scale_log2"}, dict(base, CAUSAL=True, VARLEN=False, BLOCK_M=bm, BLOCK_N=bn),
                 warps, stages)
    _compile(td._decode_kernel, dict(Q=P, K=P, V=P, BT="*i32", LENS="*i32", O=F32, LSE=F32), {"scale_log2"},
             dict(base, BLOCK_H=16, BLOCK_N=64), 4, 2)
    print("compiled")


@pytest.mark.timeout(300)
def test_triton_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    compile_all()
