"""Triton split-KV decode kernel over a paged KV cache (partials; the merge happens in dist.kernels.merge).

Grid (batch, heads_kv, splits): a program reads the KV tokens of its split once, gathering each
token's page through the block table, and serves all q heads of its GQA group (padded to 16 rows
for tl.dot). Writes partial out [splits, batch, heads_q, dim] fp32 and lse [splits, batch, heads_q];
a split past the sequence end writes out = 0, lse = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_attention
from .triton_attention import _LOG2E, _dot, _dot_f32


@triton.jit
def _decode_kernel(Q, K, V, BT, LENS, O, LSE,
                   sqb, sqh, skn, skb, skh, svn, svb, svh, sbt, sos, sob, soh,
                   batch, heads_q, group, head_dim, block_size, split_tokens, scale_log2,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = hk * group + offs_h
    h_ok = offs_h < group
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    lo = sp * split_tokens
    hi = tl.minimum(lo + split_tokens, seq_len)
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        t_ok = tok < hi
        page = tl.load(BT + b * sbt + tok // block_size, mask=t_ok, other=0).to(tl.int64)
        slot = tok % block_size
        kv_mask = t_ok[None, :] & d_ok[:, None]
        kT = tl.load(K + page[None, :] * skn + slot[None, :] * skb + hk * skh + offs_d[:, None],
                     mask=kv_mask, other=0.0)
        s = _dot(q, kT, DOT_PREC, DOT_F32) * scale_log2  # [BLOCK_H, BLOCK_N]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * svn + slot[:, None] * svb + hk * svh + offs_d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_F32)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(O + sp * sos + b * sob + heads[:, None] * soh + offs_d[None, :], out, mask=h_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (sp * batch + b) * heads_q + heads, lse, mask=h_ok)


def triton_decode_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, splits, pages_per_split):
    """-> outs fp32 [splits, batch, heads_q, dim], lses fp32 [splits, batch, heads_q]."""
    batch, heads_q, dim = q.shape
    _, block_size, heads_kv, _ = k_cache.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    outs = triton_attention._empty((splits, batch, heads_q, dim), torch.float32, q.device)
    lses = triton_attention._empty((splits, batch, heads_q), torch.float32, q.device)
    if batch == 0:
        return outs, lses
    group = heads_q // heads_kv
    block_h = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = 16 if q.device.type != "cuda" else 64
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_kernel[(batch, heads_kv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, outs, lses,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        outs.stride(0), outs.stride(1), outs.stride(2),
        batch, heads_q, group, dim, block_size, pages_per_split * block_size, scale * _LOG2E,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PREC=prec, DOT_F32=_dot_f32(q),
        num_warps=4 if q.device.type == "cuda" else 1)
    return outs, lses
