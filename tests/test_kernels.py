"""dist.kernels torch paths ("torch" = ATen CPU flash + split blocks, "math" = chunked matmul) against
a float64 reference: forward out/lse, backward with local and with ring-merged (global) out/lse,
causal offsets, seq_q != seq_k, fully masked rows, GQA 1/2/4, varlen, merge, validation."""

from __future__ import annotations

import pytest
import torch

from dist.kernels import (attention, attention_backward, attention_delta, attention_forward, merge_attention,
                          merge_attention_splits)
from tests.test_kernels_reference import ref_attention, ref_varlen

BACKENDS = ["torch", "math"]

# (seq_q, seq_k, heads_q, heads_kv, causal, causal_offset)
CASES = [
    (13, 13, 2, 2, True, 0),     # ordinary causal
    (13, 13, 4, 2, False, 0),    # non-causal, GQA 2
    (7, 19, 4, 1, True, 5),      # queries after part of the keys (ring step), GQA 4
    (19, 7, 2, 1, True, -4),     # queries before the keys: rows 0..3 see nothing
    (11, 9, 2, 2, True, 9),      # offset past the end: every key visible
    (6, 10, 2, 2, True, -6),     # no row sees any key
    (17, 5, 4, 4, True, 0),      # seq_q > seq_k, top-left aligned
]


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _qkv(b, sq, sk, hq, hkv, d, dtype=torch.float32):
    return _rand(b, sq, hq, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)


def _close(actual, expected, tol):
    assert torch.isfinite(actual).all() or torch.isinf(expected).any(), "non-finite values"
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_matches_reference(backend, case):
    torch.manual_seed(hash(case) % 1000)
    sq, sk, hq, hkv, causal, off = case
    q, k, v = _qkv(2, sq, sk, hq, hkv, 16)
    out, lse = attention_forward(q, k, v, causal=causal, causal_offset=off, backend=backend)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = ref_attention(qr, kr, vr, causal=causal, causal_offset=off)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (2, hq, sq)
    _close(out, ref_out, 2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # fully masked rows: -inf exactly there
    _close(lse, ref_lse, 2e-5)

    dout = _rand(*q.shape)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=causal, causal_offset=off, backend=backend)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    for g, rg, like in zip((dq, dk, dv), ref_grads, (q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype
        assert torch.isfinite(g).all()
        _close(g, rg, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_exact_and_custom_scale(backend):
    torch.manual_seed(1)
    q, k, v = _qkv(1, 9, 12, 4, 2, 8, dtype=torch.float64)
    out, lse = attention_forward(q, k, v, causal=True, causal_offset=3, softmax_scale=0.3, backend=backend)
    ref_out, ref_lse = ref_attention(q, k, v, causal=True, causal_offset=3, softmax_scale=0.3)
    assert out.dtype == torch.float64
    _close(out, ref_out, 1e-6)  # lse is float32 by contract; out itself is float64-exact
    _close(lse, ref_lse, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    torch.manual_seed(2)
    q, k, v = _qkv(1, 21, 21, 4, 2, 16, dtype=torch.bfloat16)
    out, lse = attention_forward(q, k, v, causal=True, causal_offset=4, backend=backend)
    ref_out, ref_lse = ref_attention(q, k, v, causal=True, causal_offset=4)
    assert out.dtype == torch.bfloat16
    _close(out, ref_out, 3e-2)
    _close(lse, ref_lse, 1e-2)
    dq, dk, dv = attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=True, causal_offset=4,
                                    backend=backend)
    assert dq.dtype == dk.dtype == torch.bfloat16 and torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("use_delta", [False, True])
def test_ring_blocks_with_global_out_lse(backend, hq, hkv, use_delta):
    """A causal sequence split into 3 key blocks (ring steps): per-block forward with offsets merged
    by merge_attention, then per-block backward given the GLOBAL out/lse (or lse and
    D = rowsum(dout * out) instead of out), equals full attention."""
    torch.manual_seed(3 + hq + hkv)
    s, d = 24, 16
    q, k, v = _qkv(2, s, s, hq, hkv, d)
    q_rows = slice(8, 16)  # this rank's query chunk: global positions 8..15
    bounds = [(0, 5), (5, 14), (14, 24)]  # key blocks of uneven size
    qc = q[:, q_rows]
    out = torch.zeros_like(qc)
    lse = torch.full((2, hq, 8), float("-inf"))
    for k0, k1 in bounds:
        o, l = attention_forward(qc, k[:, k0:k1], v[:, k0:k1], causal=True, causal_offset=8 - k0, backend=backend)
        out, lse = merge_attention(out, lse, o, l)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = ref_attention(qr, kr, vr, causal=True)
    _close(out, ref_out[:, q_rows], 2e-5)
    _close(lse, ref_lse[:, :, q_rows], 2e-5)

    dout = _rand(*qc.shape)
    dout[0, 3, 1] = 0.0  # a row and head with no gradient: D = 0 there
    delta = attention_delta(dout, out) if use_delta else None
    dq = torch.zeros_like(qc)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for k0, k1 in bounds:
        gq, gk, gv = attention_backward(dout, qc, k[:, k0:k1], v[:, k0:k1], None if use_delta else out, lse,
                                        delta=delta, causal=True, causal_offset=8 - k0, backend=backend)
        assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
        dq += gq
        dk[:, k0:k1] += gk
        dv[:, k0:k1] += gv
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out[:, q_rows], (qr, kr, vr), dout.double())
    _close(dq, ref_dq[:, q_rows], 5e-5)
    _close(dk, ref_dk, 5e-5)
    _close(dv, ref_dv, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_documents(backend):
    torch.manual_seed(4)
    cu_q, cu_k = [0, 5, 5, 17, 30], [0, 7, 9, 17, 30]  # 4 documents, one with no queries
    q, k, v = _qkv(1, 30, 30, 4, 2, 16)
    cq, ck = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    for causal, off in ((True, 0), (True, 2), (False, 0)):
        out, lse = attention_forward(q, k, v, causal=causal, causal_offset=off, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                     backend=backend)
        qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
        ref_out, ref_lse = ref_varlen(qr, kr, vr, cu_q, cu_k, causal=causal, causal_offset=off)
        _close(out, ref_out, 2e-5)
        _close(lse, ref_lse, 2e-5)
        dout = _rand(*q.shape)
        grads = attention_backward(dout, q, k, v, out, lse, causal=causal, causal_offset=off, cu_seqlens_q=cq,
                                   cu_seqlens_k=ck, backend=backend)
        for g, rg in zip(grads, torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())):
            _close(g, rg, 5e-5)


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_autograd_attention(backend):
    torch.manual_seed(5)
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 15, 15, 4, 2, 16))
    out = attention(q, k, v, causal=True, backend=backend)
    dout = _rand(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = ref_attention(qr, kr, vr, causal=True)
    _close(out.detach(), ref_out, 2e-5)
    for g, rg in zip(grads, torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())):
        _close(g, rg, 5e-5)


def test_strided_inputs():
    """Non-contiguous q/k/v (e.g. slices of a fused qkv projection) give the same result."""
    torch.manual_seed(6)
    qkv = _rand(2, 11, 3, 4, 16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, :2]
    assert not q.is_contiguous()
    out, lse = attention_forward(q, k, v, causal=True, causal_offset=1)
    ref_out, ref_lse = ref_attention(q, k, v, causal=True, causal_offset=1)
    _close(out, ref_out, 2e-5)


def test_merge_attention():
    torch.manual_seed(7)
    q, k, v = _qkv(1, 6, 10, 2, 2, 8, dtype=torch.float64)
    full_out, full_lse = ref_attention(q, k, v, causal=True, causal_offset=-2)
    a_out, a_lse = ref_attention(q, k[:, :4], v[:, :4], causal=True, causal_offset=-2)
    b_out, b_lse = ref_attention(q, k[:, 4:], v[:, 4:], causal=True, causal_offset=-6)
    assert torch.isinf(a_lse).any() and torch.isinf(b_lse).any()  # masked rows in both inputs
    out, lse = merge_attention(a_out.float(), a_lse.float(), b_out.float(), b_lse.float())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    _close(out, full_out, 1e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(full_lse))
    _close(lse, full_lse, 1e-6)
    # both -inf: stays 0 / -inf; merging with an empty block is the identity
    empty_out, empty_lse = torch.zeros_like(a_out), torch.full_like(a_lse, float("-inf"))
    out, lse = merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out, lse = merge_attention(a_out, a_lse, empty_out, empty_lse)
    assert torch.equal(out, a_out) and torch.equal(lse, a_lse)
    # in place into rows 2: of a running accumulator (views), the same as the returned merge
    acc_out, acc_lse = torch.zeros(1, 8, 2, 8), torch.full((1, 2, 8), float("-inf"))
    acc_out[:, 2:], acc_lse[:, :, 2:] = a_out.float(), a_lse.float()
    got = merge_attention(acc_out[:, 2:], acc_lse[:, :, 2:], b_out.float(), b_lse.float(), inplace=True)
    assert got[0].data_ptr() == acc_out[:, 2:].data_ptr()
    _close(acc_out[:, 2:], full_out, 1e-6)
    _close(acc_lse[:, :, 2:], full_lse, 1e-6)
    assert torch.all(acc_out[:, :2] == 0) and torch.all(acc_lse[:, :, :2] == float("-inf"))  # other rows untouched
    with pytest.raises(ValueError, match="inplace"):
        merge_attention(a_out.bfloat16(), a_lse.float(), b_out.float(), b_lse.float(), inplace=True)
    # N-way merge of three blocks equals the full result
    parts = [ref_attention(q, k[:, s], v[:, s], causal=True, causal_offset=-2 - s.start)
             for s in (slice(0, 3), slice(3, 7), slice(7, 10))]
    outs = torch.stack([p[0].transpose(1, 2) for p in parts])  # [splits, b, h, s, d]
    out, lse = merge_attention_splits(outs, torch.stack([p[1] for p in parts]))
    _close(out.transpose(1, 2), full_out, 1e-9)
    assert torch.equal(torch.isinf(lse), torch.isinf(full_lse))


def test_bad_input_raises_value_error_naming_argument():
    q, k, v = _qkv(1, 8, 8, 4, 2, 16)
    cases = [
        (lambda: attention_forward(q, k[..., :8], v[..., :8]), "head_dim"),
        (lambda: attention_forward(q, k, v[:, :5]), "v shape"),
        (lambda: attention_forward(q, k.double(), v), "k dtype"),
        (lambda: attention_forward(q, k.to("meta"), v), "k device"),
        (lambda: attention_forward(q[:, :, :3], k, v), "multiple of k heads"),
        (lambda: attention_forward(q, torch.cat([k, k]), torch.cat([v, v])), "k batch"),
        (lambda: attention_forward(q[0], k, v), "q must be 4-D"),
        (lambda: attention_forward(q.int(), k, v), "q must be float"),
        (lambda: attention_forward(q, k, v, causal_offset=1.5), "causal_offset"),
        (lambda: attention_forward(q, k, v, backend="cuda"), "backend"),
        (lambda: attention_forward(q, k, v, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), "together"),
        (lambda: attention_forward(q, k, v, cu_seqlens_q=torch.tensor([0, 9, 8], dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), "cu_seqlens_q"),
        (lambda: attention_forward(q, k, v, cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 4, 7], dtype=torch.int32)), "cu_seqlens_k"),
        (lambda: attention_forward(q, k, v, cu_seqlens_q=torch.tensor([0, 4, 8]),
                                   cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), "cu_seqlens_q"),
        (lambda: attention_forward(q, k, v, cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), "documents"),
        (lambda: attention_backward(q[:, :4], q, k, v, q, torch.zeros(1, 4, 8)), "dout"),
        (lambda: attention_backward(q, q, k, v, q[:, :4], torch.zeros(1, 4, 8)), "out"),
        (lambda: attention_backward(q, q, k, v, q, torch.zeros(1, 8, 4)), "lse"),
        (lambda: attention_backward(q, q, k, v, None, torch.zeros(1, 4, 8)), "out must be given"),
        (lambda: attention_backward(q, q, k, v, None, torch.zeros(1, 4, 8), delta=torch.zeros(1, 8, 4)), "delta"),
        (lambda: merge_attention(q, torch.zeros(1, 4, 8), q[:, :4], torch.zeros(1, 4, 4)), "block_out"),
        (lambda: merge_attention(q, torch.zeros(1, 4, 8), q, torch.zeros(1, 4, 7)), "block_lse"),
    ]
    q2 = torch.cat([q, q])
    k2, v2 = torch.cat([k, k]), torch.cat([v, v])
    cu = torch.tensor([0, 8], dtype=torch.int32)
    cases.append((lambda: attention_forward(q2, k2, v2, cu_seqlens_q=cu, cu_seqlens_k=cu), "batch == 1"))
    for fn, words in cases:
        with pytest.raises(ValueError, match=words):
            fn()


def _paged_cache(seq_lens, heads_q, heads_kv, dim, block_size, dtype=torch.float32, device="cpu", seed=0):
    """Random paged cache with shuffled page ids; unused table entries hold -1 (must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [max(1, -(-n // block_size)) for n in seq_lens]
    max_blocks = max(pages_per_seq) + 1
    num_blocks = sum(pages_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_per_seq):
        table[i, :n] = perm[used:used + n].int()
        used += n
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    q = make(len(seq_lens), heads_q, dim)
    k_cache, v_cache = make(num_blocks, block_size, heads_kv, dim), make(num_blocks, block_size, heads_kv, dim)
    return q, k_cache, v_cache, table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("heads_q,heads_kv,num_splits", [(2, 2, 1), (4, 2, 3), (8, 2, None), (4, 1, 7)])
def test_decode_attention_torch(heads_q, heads_kv, num_splits):
    from dist.kernels import decode_attention
    from tests.test_kernels_reference import ref_decode

    seq_lens = [1, 37, 0, 64, 5]  # odd lengths, an empty sequence, a full last page
    q, kc, vc, table, lens = _paged_cache(seq_lens, heads_q, heads_kv, 16, 16, seed=heads_q + heads_kv)
    out = decode_attention(q, kc, vc, table, lens, num_splits=num_splits, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, ref_decode(q, kc, vc, table, lens), 2e-5)
    assert torch.all(out[2] == 0)


def test_decode_attention_torch_mixed_lengths():
    """A batch of short sequences beside long ones (run in length groups on CPU) equals the reference."""
    from dist.kernels import decode_attention
    from tests.test_kernels_reference import ref_decode

    seq_lens = [3, 1500, 0, 40, 700, 2100, 9]
    q, kc, vc, table, lens = _paged_cache(seq_lens, 4, 2, 16, 16, seed=5)
    out = decode_attention(q, kc, vc, table, lens, backend="torch")
    _close(out, ref_decode(q, kc, vc, table, lens), 2e-5)
    assert torch.all(out[2] == 0)


def test_decode_matches_prefill_attention():
    """Decode of the last token over a cache equals the last row of causal attention."""
    from dist.kernels import decode_attention

    torch.manual_seed(9)
    s, hq, hkv, d, bs = 29, 4, 2, 16, 8
    q, k, v = _qkv(1, s, s, hq, hkv, d)
    out, _ = attention_forward(q, k, v, causal=True)
    pages = -(-s // bs)
    kc = torch.zeros(pages, bs, hkv, d)
    vc = torch.zeros(pages, bs, hkv, d)
    kc.view(-1, hkv, d)[:s], vc.view(-1, hkv, d)[:s] = k[0], v[0]
    table = torch.arange(pages, dtype=torch.int32)[None]
    dec = decode_attention(q[:, -1], kc, vc, table, torch.tensor([s], dtype=torch.int32), num_splits=3)
    _close(dec, out[:, -1], 1e-5)


def test_decode_bad_input():
    from dist.kernels import decode_attention

    q, kc, vc, table, lens = _paged_cache([5, 9], 4, 2, 16, 4)
    bad = [
        (lambda: decode_attention(q[:, :3], kc, vc, table, lens), "multiple"),
        (lambda: decode_attention(q, kc, vc[..., :8], table, lens), "v_cache shape"),
        (lambda: decode_attention(q, kc.double(), vc, table, lens), "k_cache dtype"),
        (lambda: decode_attention(q, kc, vc, table.long(), lens), "block_tables"),
        (lambda: decode_attention(q, kc, vc, table, lens.long()), "seq_lens"),
        (lambda: decode_attention(q, kc, vc, table, torch.tensor([5, 999], dtype=torch.int32)), "seq_lens"),
        (lambda: decode_attention(q, kc, vc, table.clone().fill_(50), lens), "block_tables"),
        (lambda: decode_attention(q, kc, vc, table, lens, num_splits=0), "num_splits"),
        (lambda: decode_attention(q[None], kc, vc, table, lens), "q must be"),
    ]
    for fn, words in bad:
        with pytest.raises(ValueError, match=words):
            fn()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_blocks(backend):
    """A ring step may hand over an empty key block or an empty query block."""
    q, k, v = _qkv(1, 5, 0, 2, 1, 16)
    out, lse = attention_forward(q, k, v, causal=True, causal_offset=3, backend=backend)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = attention_backward(torch.ones_like(q), q, k, v, out, lse, backend=backend)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = _qkv(1, 0, 6, 2, 1, 16)
    out, lse = attention_forward(q, k, v, backend=backend)
    assert out.shape == q.shape and lse.shape == (1, 2, 0)
    dq, dk, dv = attention_backward(out, q, k, v, out, lse, backend=backend)
    assert torch.all(dk == 0) and torch.all(dv == 0)
