"""Attention kernels. PLACEHOLDER until the kernels work lands: `attention` via torch SDPA."""

import torch
import torch.nn.functional as F


def attention(q, k, v, *, causal=True, softmax_scale=None):
    """q: [batch, seq, heads_q, dim]; k, v: [batch, seq, heads_kv, dim] -> [batch, seq, heads_q, dim]."""
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)
