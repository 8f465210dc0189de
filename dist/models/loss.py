"""Per-token cross-entropy that never holds float32 log-probabilities for the whole sequence.

    losses = token_losses(logits[0], labels)      # [n, vocab] (any float dtype), [n] -> float32 [n]

F.cross_entropy(logits.float()) keeps [n, vocab] float32 log-probabilities for backward and makes
[n, vocab] float32 gradients in it: at 16K tokens per GPU and a 128K vocabulary that is 8 GB saved
and 16 GB transient, more than a layer's activations. Here forward walks the rows in chunks of at
most CHUNK_BYTES of float32 and keeps only the logits (which the caller holds anyway) and one
float32 log-sum-exp per row; backward recomputes each chunk's softmax and writes the gradient
straight into a tensor of the logits' dtype. Losses equal F.cross_entropy's to float32 rounding.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 2 ** 28  # float32 working set of one chunk: [rows, vocab] x 4 bytes


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class _TokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
        n, vocab = logits.shape
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = logits.gather(1, safe[:, None])[:, 0].float()
        step = chunk_rows(vocab)
        for s in range(0, n, step):
            lse[s:s + step] = torch.logsumexp(logits[s:s + step].float(), dim=-1)
        ctx.save_for_backward(logits, safe, valid, lse)
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        n, vocab = logits.shape
        g = torch.where(valid, grad, 0.0)  # [n] float32
        out = torch.empty_like(logits)
        step = chunk_rows(vocab)
        for s in range(0, n, step):
            e = s + step
            p = torch.exp(logits[s:e].float() - lse[s:e, None])  # softmax [rows, vocab] float32
            p.scatter_add_(1, safe[s:e, None], -torch.ones_like(lse[s:e, None]))
            out[s:e] = p.mul_(g[s:e, None])
        return out, None, None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [n, vocab], labels [n] int64 -> float32 losses [n]; 0 where labels == ignore_index."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"token_losses: logits must be [n, vocab] and labels [n], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return _TokenLosses.apply(logits, labels, ignore_index)
