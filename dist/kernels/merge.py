"""THE merge of partial attention results (the one place this concept lives).

Two attention results over disjoint key sets, each normalised over its own keys and carrying the
log-sum-exp (lse) of its scores, combine exactly into the result over the union of the keys:

    lse = log(exp(lse_a) + exp(lse_b));  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A row that saw no key has lse = -inf and out = 0; the guards below keep such rows finite (a row
that is -inf in both inputs stays out = 0, lse = -inf).
"""

from __future__ import annotations

import torch


def _weights(lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """exp(lse - total) with 0 where total = -inf (no key seen at all)."""
    safe_total = total.masked_fill(total == float("-inf"), 0.0)
    return torch.exp(lse - safe_total)


def merge_attention(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                    block_lse: torch.Tensor, *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets.

    out, block_out: [batch, seq, heads, dim]; lse, block_lse: [batch, heads, seq] float32.
    Computed in float32 (float64 if either out is float64). Returns (out, lse): out in `out.dtype`,
    lse float32 (float64 if lse is float64). Rows with lse = -inf in both inputs give out = 0, lse = -inf.
    inplace=True writes the result into `out` and `lse` (views allowed: a running accumulator's
    rows) and returns them; out must then be in the computation dtype, lse float32/float64.
    """
    if out.shape != block_out.shape:
        raise ValueError(f"block_out shape {tuple(block_out.shape)} != out shape {tuple(out.shape)}")
    expected = (out.shape[0], out.shape[2], out.shape[1])
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [batch, heads, seq] = {expected}, got {tuple(lse.shape)}")
    if tuple(block_lse.shape) != expected:
        raise ValueError(f"block_lse must have shape [batch, heads, seq] = {expected}, got {tuple(block_lse.shape)}")
    acc = torch.float64 if torch.float64 in (out.dtype, block_out.dtype) else torch.float32
    lse_acc = torch.float64 if lse.dtype == torch.float64 else torch.float32
    if inplace and (out.dtype != acc or lse.dtype != lse_acc):
        raise ValueError(f"inplace=True needs out in {acc} and lse float32/float64, got {out.dtype} and {lse.dtype}")
    lse_a, lse_b = lse.to(lse_acc), block_lse.to(lse_acc)
    new_lse = torch.logaddexp(lse_a, lse_b)  # logaddexp(-inf, -inf) = -inf
    w_a = _weights(lse_a, new_lse).transpose(1, 2).unsqueeze(-1).to(acc)  # [batch, seq, heads, 1]
    w_b = _weights(lse_b, new_lse).transpose(1, 2).unsqueeze(-1).to(acc)
    if inplace:  # one pass over out, no temporaries of its size
        out.mul_(w_a).addcmul_(block_out.to(acc), w_b)
        lse.copy_(new_lse)
        return out, lse
    merged = w_a * out.to(acc) + w_b * block_out.to(acc)
    return merged.to(out.dtype), new_lse


def merge_attention_splits(outs: torch.Tensor, lses: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N partial results stacked along `dim` (same formula as `merge_attention`).

    outs: [..., dim_value] with the split axis at `dim` (e.g. [splits, batch, heads, dim]);
    lses: outs.shape[:-1] (e.g. [splits, batch, heads]). Returns (out, lse) with `dim` reduced;
    out in float32 (float64 for float64 inputs), lse float32/float64. Used by flash-decoding.
    """
    if tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"lses must have shape {tuple(outs.shape[:-1])}, got {tuple(lses.shape)}")
    acc = torch.float64 if outs.dtype == torch.float64 else torch.float32
    lses = lses.to(torch.float64 if lses.dtype == torch.float64 else torch.float32)
    total = torch.logsumexp(lses, dim=dim)  # all -inf -> -inf
    w = _weights(lses, total.unsqueeze(dim)).unsqueeze(-1).to(acc)
    return (w * outs.to(acc)).sum(dim), total
