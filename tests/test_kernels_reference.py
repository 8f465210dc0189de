"""Float64 reference attention for the kernel tests (independent of dist.kernels: plain softmax)."""

from __future__ import annotations

import math

import torch


def ref_attention(q, k, v, *, causal=True, causal_offset=0, softmax_scale=None):
    """Dense reference. q [b, sq, hq, d]; k, v [b, sk, hkv, d] -> out [b, sq, hq, d], lse [b, hq, sq].

    Computed in float64 and differentiable; rows without a visible key give out 0, lse -inf and
    zero gradients. Row i sees column j iff j <= i + causal_offset (when causal).
    """
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        visible = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + causal_offset
    else:
        visible = torch.ones(sq, sk, dtype=torch.bool)
    has_key = visible.any(-1)  # [sq]
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~has_key[:, None], 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    out = torch.where(has_key[None, :, None, None], out, torch.zeros_like(out))
    lse = lse.masked_fill(~has_key, float("-inf"))
    return out, lse


def ref_varlen(q, k, v, cu_q, cu_k, *, causal=True, causal_offset=0, softmax_scale=None):
    """Per-document reference for packed input (batch 1); cu_* are lists of cumulative lengths."""
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        o, l = ref_attention(q[:, qs], k[:, ks], v[:, ks], causal=causal, causal_offset=causal_offset,
                             softmax_scale=softmax_scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def ref_decode(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale=None):
    """q [b, hq, d]; caches [blocks, block_size, hkv, d] -> out [b, hq, d] float64 (gathers pages)."""
    bs = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        pages = block_tables[b, : (n + bs - 1) // bs].long()
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        o, _ = ref_attention(q[b][None, None], k[None], v[None], causal=False, softmax_scale=softmax_scale)
        outs.append(o[0, 0])
    return torch.stack(outs)


def test_reference_matches_sdpa():
    """The reference itself against torch SDPA (GQA expanded, causal and not, seq_q == seq_k)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 9, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 9, 2, 8, dtype=torch.float64)
    for causal in (False, True):
        out, lse = ref_attention(q, k, v, causal=causal)
        kk, vv = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (k, v))
        expect = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(out, expect)
        s = torch.einsum("bihd,bjhd->bhij", q, kk.transpose(1, 2)) / math.sqrt(8)
        if causal:
            s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse, s.logsumexp(-1))
    # a fully masked row: out 0, lse -inf, finite zero gradients
    q.requires_grad_(True)
    out, lse = ref_attention(q, k, v, causal=True, causal_offset=-3)
    assert torch.all(out[:, :3] == 0) and torch.all(lse[:, :, :3] == float("-inf"))
    (g,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(g).all() and torch.all(g[:, :3] == 0)
