"""dist.models.token_losses against float64 F.cross_entropy, and what it keeps for backward."""

import pytest
import torch
import torch.nn.functional as F

import dist.models.loss as loss_mod
from dist.memory import saved_activation_bytes
from dist.models import token_losses


def _case(dtype, n=37, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[3, 17, n - 1]] = -100
    weights = torch.randn(n, generator=g)
    return logits, labels, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_losses_and_gradients_equal_float64_cross_entropy(monkeypatch, dtype, chunk_rows):
    logits, labels, w = _case(dtype)
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * logits.shape[1] * chunk_rows)
    x = logits.clone().requires_grad_()
    losses = token_losses(x, labels)
    (losses * w).sum().backward()

    ref_x = logits.double().requires_grad_()
    ref = F.cross_entropy(ref_x, labels, reduction="none")
    (ref * w.double()).sum().backward()

    assert losses.dtype == torch.float32 and x.grad.dtype == dtype
    assert torch.all(losses[labels == -100] == 0) and torch.all(x.grad[labels == -100] == 0)
    # fp32 log-sum-exp over 50 terms of |x| <~ 12: a few ulps of the result
    torch.testing.assert_close(losses.double(), ref, rtol=0, atol=1e-5)
    # the gradient is computed in fp32 and rounded once to the logits' dtype
    atol = 1e-6 if dtype == torch.float32 else 2 ** -8 * ref_x.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=0, atol=atol)


def test_keeps_logits_not_float32_log_probabilities():
    """What autograd keeps for backward: the bf16 logits and O(n) per-row state, not [n, vocab] float32
    (plain F.cross_entropy on .float() keeps those, 2x the logits' bytes more)."""
    logits, labels, _ = _case(torch.bfloat16, n=64, vocab=512)
    x = logits.clone().requires_grad_()
    with saved_activation_bytes() as ours:
        token_losses(x, labels).sum()
    with saved_activation_bytes() as plain:
        F.cross_entropy(x.float(), labels, reduction="none").sum()
    n, vocab = logits.shape
    assert ours.bytes <= x.numel() * 2 + 16 * n
    assert plain.bytes >= n * vocab * 4  # the reference does keep float32 [n, vocab]


def test_bad_shapes_name_the_arguments():
    with pytest.raises(ValueError, match="logits must be"):
        token_losses(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        token_losses(torch.zeros(5, 4), torch.zeros(4, dtype=torch.long))
