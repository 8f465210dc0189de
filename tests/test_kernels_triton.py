"""Triton attention kernels against the float64 reference. On a machine without CUDA they run on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1, set here before the kernels are defined);
with CUDA they run compiled on the GPU. Every output buffer is NaN-poisoned before the call, so an
element a kernel fails to write fails the test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed", allow_module_level=True)
if not torch.cuda.is_available() and "triton" not in sys.modules:
    # must precede the first import of triton (its standard library is jitted at import time) and of
    # our kernel modules; it stays set (triton also reads it while running interpreted kernels)
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402

from dist.kernels import (attention, attention_backward, attention_delta, attention_forward,  # noqa: E402
                          merge_attention)
from dist.kernels import triton_attention, triton_decode  # noqa: E402, F401
from tests.test_kernels_reference import ref_attention, ref_varlen  # noqa: E402

# On CPU the kernels only run interpreted; if triton was imported earlier in this process without
# TRITON_INTERPRET (another test module importing transformers does that), rerun this file in a
# fresh interpreter-mode subprocess instead.
RUNNABLE = torch.cuda.is_available() or type(tl.zeros).__name__ == "InterpretedFunction"
in_process = pytest.mark.skipif(not RUNNABLE, reason="triton imported without TRITON_INTERPRET; see subprocess test")


@pytest.mark.timeout(400)
@pytest.mark.skipif(RUNNABLE, reason="kernels run in this process")
def test_triton_kernels_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    real = triton_attention._empty

    def nan_empty(shape, dtype, device):
        return real(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(triton_attention, "_empty", nan_empty)


def _qkv(b, sq, sk, hq, hkv, d, dtype=torch.float32):
    make = lambda *s: torch.randn(*s, dtype=torch.float64).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return make(b, sq, hq, d), make(b, sk, hkv, d), make(b, sk, hkv, d)


def _close(actual, expected, tol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


def _check(q, k, v, dout, tol, gtol, **kw):
    """Forward + backward through the triton backend vs the reference (kw: causal, causal_offset)."""
    out, lse = attention_forward(q, k, v, backend="triton", **kw)
    qr, kr, vr = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = ref_attention(qr, kr, vr, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    _close(out, ref_out, tol)
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse))
    _close(lse, ref_lse, tol)
    grads = attention_backward(dout, q, k, v, out, lse, backend="triton", **kw)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double().cpu())
    for g, rg, like in zip(grads, ref_grads, (q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype
        assert torch.isfinite(g).all(), "NaN/inf in gradient (unwritten or masked-row leak)"
        _close(g, rg, gtol)


# (seq_q, seq_k, heads_q, heads_kv, dim, causal, causal_offset): odd lengths, GQA 1/2/4,
# offsets +/-/0, fully masked rows, seq_q != seq_k, dim 16/32 and a padded dim (24)
CASES = [
    (37, 37, 2, 2, 16, True, 0),
    (23, 41, 4, 1, 32, True, 9),
    (41, 19, 4, 2, 16, True, -7),
    (29, 33, 2, 1, 24, False, 0),
    (18, 10, 2, 2, 16, True, -18),  # nothing visible at all
]


@in_process
@pytest.mark.parametrize("case", CASES)
def test_triton_forward_backward(case):
    torch.manual_seed(sum(case[:5]))
    sq, sk, hq, hkv, d, causal, off = case
    q, k, v = _qkv(2, sq, sk, hq, hkv, d)
    dout = torch.randn_like(q)
    _check(q, k, v, dout, 2e-5, 5e-5, causal=causal, causal_offset=off)


@in_process
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_precision(dtype, tol):
    torch.manual_seed(11)
    q, k, v = _qkv(1, 33, 33, 4, 2, 32, dtype=dtype)
    dout = torch.randn_like(q)
    _check(q, k, v, dout, tol, 8 * tol, causal=True, causal_offset=3)


@in_process
def test_triton_varlen_documents():
    torch.manual_seed(12)
    cu_q, cu_k = [0, 9, 9, 30, 47], [0, 11, 14, 30, 47]  # 4 documents, one without queries
    q, k, v = _qkv(1, 47, 47, 4, 2, 16)
    cq = torch.tensor(cu_q, dtype=torch.int32, device=DEVICE)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=DEVICE)
    for causal, off in ((True, 0), (False, 0), (True, -2)):
        kw = dict(causal=causal, causal_offset=off, cu_seqlens_q=cq, cu_seqlens_k=ck, backend="triton")
        out, lse = attention_forward(q, k, v, **kw)
        qr, kr, vr = (t.double().cpu().requires_grad_(True) for t in (q, k, v))
        ref_out, ref_lse = ref_varlen(qr, kr, vr, cu_q, cu_k, causal=causal, causal_offset=off)
        _close(out, ref_out, 2e-5)
        _close(lse, ref_lse, 2e-5)
        dout = torch.randn_like(q)
        grads = attention_backward(dout, q, k, v, out, lse, **kw)
        for g, rg in zip(grads, torch.autograd.grad(ref_out, (qr, kr, vr), dout.double().cpu())):
            assert torch.isfinite(g).all()
            _close(g, rg, 5e-5)


@in_process
def test_triton_ring_blocks_with_global_out_lse():
    """Per-block kernels with offsets, merged, then backward with the global out/lse (a ring step)."""
    torch.manual_seed(13)
    s, hq, hkv = 48, 4, 2
    q, k, v = _qkv(1, s, s, hq, hkv, 16)
    rows, bounds = slice(16, 32), [(0, 13), (13, 30), (30, 48)]
    qc = q[:, rows]
    out = torch.zeros_like(qc)
    lse = torch.full((1, hq, 16), float("-inf"), device=DEVICE)
    for k0, k1 in bounds:
        o, l = attention_forward(qc, k[:, k0:k1], v[:, k0:k1], causal=True, causal_offset=16 - k0, backend="triton")
        out, lse = merge_attention(out, lse, o, l)
    qr, kr, vr = (t.double().cpu().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = ref_attention(qr, kr, vr, causal=True)
    _close(out, ref_out[:, rows], 2e-5)
    dout = torch.randn_like(qc)
    delta = attention_delta(dout, out)  # the middle block gets D = rowsum(dout * out) instead of out
    dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(k), torch.zeros_like(v)
    for i, (k0, k1) in enumerate(bounds):
        gq, gk, gv = attention_backward(dout, qc, k[:, k0:k1], v[:, k0:k1], None if i == 1 else out, lse,
                                        delta=delta if i == 1 else None, causal=True,
                                        causal_offset=16 - k0, backend="triton")
        dq += gq
        dk[:, k0:k1] += gk
        dv[:, k0:k1] += gv
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out[:, rows], (qr, kr, vr), dout.double().cpu())
    for g, rg in zip((dq, dk, dv), (ref_dq[:, rows], ref_dk, ref_dv)):
        _close(g, rg, 5e-5)


@in_process
def test_triton_autograd_matches_torch_backend():
    torch.manual_seed(14)
    qkv = torch.randn(1, 25, 4, 16, device=DEVICE, requires_grad=True)  # fused projection: strided q/k/v views
    q, k, v = qkv[:, :, :2], qkv[:, :, 2:3], qkv[:, :, 3:]
    out = attention(q, k, v, causal=True, backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    out_t = attention(q, k, v, causal=True, backend="torch")
    grads_t = torch.autograd.grad(out_t.sum(), (q, k, v))
    _close(out.detach(), out_t.detach(), 1e-5)
    for g, gt in zip(grads, grads_t):
        _close(g, gt, 5e-5)


@in_process
def test_triton_rejects_float64_before_launch():
    q, k, v = _qkv(1, 4, 4, 2, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        attention_forward(q, k, v, backend="triton")


@in_process
@pytest.mark.parametrize("heads_q,heads_kv,block_size,num_splits,dtype", [
    (4, 4, 16, 2, torch.float32),
    (4, 2, 8, 5, torch.float32),
    (8, 2, 16, None, torch.float16),
    (4, 1, 5, 3, torch.bfloat16),  # block size not a power of two
])
def test_triton_decode(heads_q, heads_kv, block_size, num_splits, dtype):
    from dist.kernels import decode_attention
    from tests.test_kernels import _paged_cache
    from tests.test_kernels_reference import ref_decode

    seq_lens = [1, 45, 0, 32, 7]
    q, kc, vc, table, lens = _paged_cache(seq_lens, heads_q, heads_kv, 32, block_size, dtype=dtype, device=DEVICE,
                                          seed=heads_q * block_size)
    out = decode_attention(q, kc, vc, table, lens, num_splits=num_splits, backend="triton")
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    _close(out, ref_decode(q.cpu(), kc.cpu(), vc.cpu(), table.cpu(), lens.cpu()), tol)


@in_process
def test_triton_empty_blocks():
    q, k, v = _qkv(1, 5, 0, 2, 1, 16)
    out, lse = attention_forward(q, k, v, causal=True, causal_offset=3, backend="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = attention_backward(torch.ones_like(q), q, k, v, out, lse, backend="triton")
    assert torch.all(dq == 0) and dk.shape == k.shape
    q, k, v = _qkv(1, 0, 6, 2, 1, 16)
    out, lse = attention_forward(q, k, v, backend="triton")
    dq, dk, dv = attention_backward(out, q, k, v, out, lse, backend="triton")
    assert out.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


@in_process
def test_triton_other_tile_shapes(monkeypatch):
    """The block-range logic (masked / unmasked splits) with the tile shapes swapped."""
    monkeypatch.setattr(triton_attention, "_config", lambda q: dict(fwd=(16, 32, 1, 1), bwd=(32, 16, 1, 1)))
    torch.manual_seed(15)
    for sq, sk, off in ((45, 45, 0), (30, 70, 23), (70, 30, -9)):
        q, k, v = _qkv(1, sq, sk, 4, 2, 16)
        _check(q, k, v, torch.randn_like(q), 2e-5, 5e-5, causal=True, causal_offset=off)
