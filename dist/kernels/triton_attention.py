"""Triton flash-attention kernels with log-sum-exp: forward, backward (preprocess, dk/dv, dq).

Imported lazily by dist.kernels.attention (triton is an optional extra). Layout as in the public API:
q/out/dout [batch, seq_q, heads_q, dim]; k/v/dk/dv [batch, seq_k, heads_kv, dim]; lse/delta float32
[batch, heads_q, seq_q]. Features handled inside the kernels:
  - causal with an offset: row i sees column j iff j <= i + offset; rows that see nothing give
    out = 0, lse = -inf, and contribute nothing to gradients (lse = -inf is read as +inf in backward);
  - GQA: q head h reads kv head h // (heads_q // heads_kv); dk/dv programs loop over their group;
  - varlen: with cu_seqlens the program's "batch" index is the document and row offsets come from
    cu_seqlens (batch == 1);
  - any lengths (masked tails), head_dim padded to a power of two >= 16.
Arithmetic: fp32 accumulation; scores in log2 units (exp2). fp32 inputs use exact ("ieee") dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests replace it with a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """tl.dot with fp32 accumulation; DOT_F32 upcasts operands (the interpreter cannot dot bf16)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _doc_bounds(CU, doc, seq_len, VARLEN: tl.constexpr):
    """(first row as int64, number of rows) of document `doc` (varlen) or of the whole sequence."""
    if VARLEN:
        start32 = tl.load(CU + doc)
        length = tl.load(CU + doc + 1) - start32
        start = start32.to(tl.int64)  # packed offsets * row stride can pass 2**31
    else:
        start = 0
        length = seq_len
    return start, length


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_n, offs_d, d_ok,
               lo, hi, k_len, offset, scale_log2, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax over key blocks [lo, hi); MASKED applies the bounds and causal masks."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            n_ok = cols < k_len
            kT = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = _dot(q, kT, DOT_PREC, DOT_F32) * scale_log2
        if MASKED:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + offset)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_F32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                seq_q, seq_k, heads_q, group, head_dim, scale_log2, offset,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest row blocks start first
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    q_start, q_len = _doc_bounds(CU_Q, b, seq_q, VARLEN)
    k_start, k_len = _doc_bounds(CU_K, b, seq_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    bq = 0 if VARLEN else b.to(tl.int64)  # batch index of the tensors (varlen: batch 1, rows from cu_seqlens)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    q_ptrs = Q + bq * sqb + h * sqh + (q_start + offs_m)[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + bq * skb + hk * skh + k_start * sks
    v_base = V + bq * svb + hk * svh + k_start * svs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # columns [0, full) are visible to every row of the block and in bounds: no masking there;
    # columns [full, hi) need the bounds / causal mask.
    hi = k_len
    full = k_len
    if CAUSAL:  # row i sees j <= i + offset: the block's last row sees up to (pid_m + 1) * BLOCK_M - 1 + offset
        hi = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + offset)
        full = tl.minimum(k_len, pid_m * BLOCK_M + offset + 1)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_n, offs_d, d_ok,
                               0, full, k_len, offset, scale_log2, CAUSAL, False, BLOCK_N, DOT_PREC, DOT_F32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_n, offs_d, d_ok,
                               full, hi, k_len, offset, scale_log2, CAUSAL, True, BLOCK_N, DOT_PREC, DOT_F32)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptrs = O + bq * sob + h * soh + (q_start + offs_m)[:, None] * sos + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # lse / delta are [batch, heads_q, seq_q] contiguous; varlen: batch 1, rows q_start + i
    tl.store(LSE + (bq * heads_q + h) * seq_q + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, sob, sos, soh, sdb, sds, sdh, seq_q, heads_q, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    h = pid_bh % heads_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, sqs, sds, offs_n, offs_m, offs_d, d_ok, n_ok,
                lo, hi, q_len, offset, scale_log2, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """Accumulate dk, dv [BLOCK_N, BLOCK_D] over query row blocks [lo, hi) of one q head."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            m_ok = rows < q_len
            qm = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :], mask=qm, other=0.0)
            do = tl.load(do_base + rows[:, None] * sds + offs_d[None, :], mask=qm, other=0.0)
            lse = tl.load(LSE + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
        else:
            q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            do = tl.load(do_base + rows[:, None] * sds + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # -inf rows: P = 0
        sT = _dot(k, tl.trans(q), DOT_PREC, DOT_F32) * scale_log2  # [BLOCK_N, BLOCK_M]
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            valid = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= rows[None, :] + offset)
            pT = tl.where(valid, pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, DOT_PREC, DOT_F32)
        dpT = _dot(v, tl.trans(do), DOT_PREC, DOT_F32)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, DOT_PREC, DOT_F32)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
                     sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
                     seq_q, seq_k, heads_q, heads_kv, group, head_dim, scale, scale_log2, offset,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """One program = one block of BLOCK_N keys of one kv head; loops over the q heads of its group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_kv
    hk = pid_bh % heads_kv
    q_start, q_len = _doc_bounds(CU_Q, b, seq_q, VARLEN)
    k_start, k_len = _doc_bounds(CU_K, b, seq_k, VARLEN)
    if pid_n * BLOCK_N >= k_len:
        return
    bq = 0 if VARLEN else b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    d_ok = offs_d < head_dim
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + bq * skb + hk * skh + (k_start + offs_n)[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + bq * svb + hk * svh + (k_start + offs_n)[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # row ranges for this key block: [lo, mid) partly visible (masked), [mid, full) see the whole block
    # (unmasked; only when the block is inside the keys), the rest up to q_len masked again.
    n0 = pid_n * BLOCK_N
    lo = 0
    mid = 0
    if CAUSAL:  # row i sees column j iff j <= i + offset
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    full = q_len // BLOCK_M * BLOCK_M
    if n0 + BLOCK_N > k_len:
        full = 0
    mid_end = tl.minimum(mid, q_len)
    tail = tl.maximum(mid, full)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + bq * sqb + h * sqh + q_start * sqs
        do_base = DO + bq * sdb + h * sdh + q_start * sds
        row_base = (bq * heads_q + h) * seq_q + q_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, sqs, sds,
                             offs_n, offs_m, offs_d, d_ok, n_ok, lo, mid_end, q_len, offset, scale_log2,
                             CAUSAL, True, BLOCK_M, DOT_PREC, DOT_F32)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, sqs, sds,
                             offs_n, offs_m, offs_d, d_ok, n_ok, mid, full, q_len, offset, scale_log2,
                             CAUSAL, False, BLOCK_M, DOT_PREC, DOT_F32)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, sqs, sds,
                             offs_n, offs_m, offs_d, d_ok, n_ok, tail, q_len, q_len, offset, scale_log2,
                             CAUSAL, True, BLOCK_M, DOT_PREC, DOT_F32)
    dk = dk * scale
    tl.store(DK + bq * sdkb + hk * sdkh + (k_start + offs_n)[:, None] * sdks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + bq * sdvb + hk * sdvh + (k_start + offs_n)[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_n, offs_d, d_ok, m_ok,
              lo, hi, k_len, offset, scale_log2, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """Accumulate dq [BLOCK_M, BLOCK_D] over key blocks [lo, hi) (lse in log2 units, -inf rows as +inf)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            n_ok = cols < k_len
            km = n_ok[:, None] & d_ok[None, :]
        else:
            km = d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :], mask=km, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=km, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC, DOT_F32) * scale_log2
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            valid = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + offset)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PREC, DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PREC, DOT_F32)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sdqb, sdqs, sdqh,
                   seq_q, seq_k, heads_q, group, head_dim, scale, scale_log2, offset,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """One program = one block of BLOCK_M query rows of one q head; loops over the visible keys."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest row blocks start first
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    q_start, q_len = _doc_bounds(CU_Q, b, seq_q, VARLEN)
    k_start, k_len = _doc_bounds(CU_K, b, seq_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    bq = 0 if VARLEN else b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    qm = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + bq * sqb + h * sqh + (q_start + offs_m)[:, None] * sqs + offs_d[None, :], mask=qm, other=0.0)
    do = tl.load(DO + bq * sdb + h * sdh + (q_start + offs_m)[:, None] * sds + offs_d[None, :], mask=qm, other=0.0)
    row_base = (bq * heads_q + h) * seq_q + q_start
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + bq * skb + hk * skh + k_start * sks
    v_base = V + bq * svb + hk * svh + k_start * svs
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = k_len  # key blocks [0, full) are visible to every row and in bounds, [full, hi) need masks
    full = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + offset)
        full = tl.minimum(k_len, pid_m * BLOCK_M + offset + 1)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_n, offs_d, d_ok, m_ok,
                   0, full, k_len, offset, scale_log2, CAUSAL, False, BLOCK_N, DOT_PREC, DOT_F32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_n, offs_d, d_ok, m_ok,
                   full, hi, k_len, offset, scale_log2, CAUSAL, True, BLOCK_N, DOT_PREC, DOT_F32)
    dq = dq * scale
    tl.store(DQ + bq * sdqb + h * sdqh + (q_start + offs_m)[:, None] * sdqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qm)


# ----------------------------------------------------------------------------------------------
# launchers (inputs validated by dist.kernels.attention)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _config(q):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for forward and backward; small tiles when interpreted.
    Untuned first choices for H100 (they compile for sm_90 within its shared memory); see README."""
    if q.device.type != "cuda":
        return dict(fwd=(32, 16, 1, 1), bwd=(16, 32, 1, 1))  # unequal tiles exercise the block logic
    warps = 8 if q.shape[-1] > 64 else 4
    if q.dtype == torch.float32:  # 4-byte tiles: halve the forward tile to stay within shared memory
        return dict(fwd=(64, 64, warps, 2), bwd=(64, 64, warps, 2))
    return dict(fwd=(128, 64, warps, 3), bwd=(64, 64, warps, 2))


def _common(q, k, varlen):
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    if varlen is None:
        n_docs, max_q, max_k = batch, seq_q, seq_k
    else:
        cq, ck = varlen
        n_docs = len(cq) - 1
        max_q = max(b - a for a, b in zip(cq, cq[1:]))
        max_k = max(b - a for a, b in zip(ck, ck[1:]))
    block_d = max(16, triton.next_power_of_2(head_dim))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return batch, seq_q, seq_k, heads_q, heads_kv, head_dim, n_docs, max_q, max_k, block_d, prec


def _dot_f32(t):
    """The Triton interpreter (CPU tensors) computes bf16 dots wrongly: upcast there."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def _cu(cu, like):
    # a dummy pointer when not varlen (never read: VARLEN is a constexpr)
    return like if cu is None else cu.to(device=like.device, dtype=torch.int32)


def triton_forward(q, k, v, scale, causal, offset, cu_seqlens_q, cu_seqlens_k, varlen):
    """-> out [batch, seq_q, heads_q, dim] (q.dtype), lse float32 [batch, heads_q, seq_q]."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, seq_q, seq_k, heads_q, heads_kv, dim, n_docs, max_q, max_k, block_d, prec = _common(q, k, varlen)
    out = _empty((batch, seq_q, heads_q, dim), q.dtype, q.device)
    lse = _empty((batch, heads_q, seq_q), torch.float32, q.device)
    if seq_q == 0:
        return out, lse
    block_m, block_n, warps, stages = _config(q)["fwd"]
    grid = (triton.cdiv(max(max_q, 1), block_m), n_docs * heads_q)
    cu_q, cu_k = _cu(cu_seqlens_q, lse), _cu(cu_seqlens_k, lse)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        seq_q, seq_k, heads_q, heads_q // heads_kv, dim, scale * _LOG2E, offset,
        CAUSAL=bool(causal), VARLEN=varlen is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC=prec, DOT_F32=_dot_f32(q), num_warps=warps, num_stages=stages)
    return out, lse


def triton_backward(dout, q, k, v, out, lse, scale, causal, offset, cu_seqlens_q, cu_seqlens_k, varlen,
                    delta=None):
    """-> dq like q, dk like k, dv like v (dk/dv summed over each GQA group). delta: D = rowsum(dout * out)
    float32 [batch, heads_q, seq_q] if known (then out is not read and may be None)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dout = _last_dim_contiguous(dout)
    lse = lse.contiguous()
    batch, seq_q, seq_k, heads_q, heads_kv, dim, n_docs, max_q, max_k, block_d, prec = _common(q, k, varlen)
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if seq_q == 0 or seq_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_m, block_n, warps, stages = _config(q)["bwd"]
    if delta is not None:
        delta = delta.to(torch.float32).contiguous()
    else:
        out = _last_dim_contiguous(out)
        delta = _empty((batch, heads_q, seq_q), torch.float32, q.device)
        _bwd_preprocess[(triton.cdiv(seq_q, block_m), batch * heads_q)](
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), seq_q, heads_q, dim, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    cu_q, cu_k = _cu(cu_seqlens_q, lse), _cu(cu_seqlens_k, lse)
    group = heads_q // heads_kv
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    flags = dict(CAUSAL=bool(causal), VARLEN=varlen is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=block_d, DOT_PREC=prec, DOT_F32=_dot_f32(q), num_warps=warps, num_stages=stages)
    _bwd_dkdv_kernel[(triton.cdiv(max_k, block_n), n_docs * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        seq_q, seq_k, heads_q, heads_kv, group, dim, scale, scale * _LOG2E, offset, **flags)
    _bwd_dq_kernel[(triton.cdiv(max_q, block_m), n_docs * heads_q)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        seq_q, seq_k, heads_q, group, dim, scale, scale * _LOG2E, offset, **flags)
    return dq, dk, dv
