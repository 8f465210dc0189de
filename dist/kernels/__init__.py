"""Attention kernels: block attention with log-sum-exp (forward/backward, causal offsets, GQA, varlen),
the one merge of partial results, and paged split-KV decode. Triton on CUDA, torch on CPU.

    from dist.kernels import attention, attention_forward, attention_backward, merge_attention, decode_attention

Shapes: q [batch, seq_q, heads_q, dim]; k, v [batch, seq_k, heads_kv, dim]; lse float32 [batch, heads_q, seq_q].
See dist/kernels/README.md.
"""

from .attention import (attention, attention_backward, attention_delta, attention_forward, cu_seqlens,
                        triton_available)
from .decode import decode_attention
from .merge import merge_attention, merge_attention_splits

__all__ = [
    "attention",
    "attention_forward",
    "attention_backward",
    "attention_delta",
    "cu_seqlens",
    "merge_attention",
    "decode_attention",
    "merge_attention_splits",
    "triton_available",
]
