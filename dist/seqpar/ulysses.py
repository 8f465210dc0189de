"""Ulysses sequence parallelism (the DeepSpeed-Ulysses scheme): all-to-all from sequence shards to
head shards, full-sequence attention on 1/P of the heads, all-to-all back.

    out_local = ulysses_attention(q_local, k_local, v_local, causal=True, group=sp_group, layout="zigzag")

q: [batch, local_seq, heads_q, dim], k/v: [batch, local_seq, heads_kv, dim], this rank's shard in
`layout` (dist.ringattn.shard), exactly as ring_attention takes them; returns this rank's shard of
attention over the whole sequence, differentiable in q, k and v (the backward runs the same
all-to-alls in reverse). heads_q must be divisible by the group size P. K/V
heads are repeated up to lcm(heads_kv, P) when P does not divide them (GQA stays exact, at more bytes).

q, k and v travel together: one all-to-all of the three packed per destination, and one back for
out; the backward runs the same two in reverse (one for dO, one for dq, dk, dv packed). Bytes per
rank: (P-1)/P of q, k, v out and of out back, the same for the gradients (dist.sim's "ulysses"
schedule). No overlap with compute: Ulysses wins where heads divide P and all-to-all is fast.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from dist import comm
from dist.kernels import attention
from dist.ringattn import seq_lengths, shard_positions


class _AllToAll(torch.autograd.Function):
    """x [P, ...]: slice i goes to rank i; the result's slice j came from rank j. The map is its own
    adjoint, so the backward is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_to_all(x, group, "ulysses")

    @staticmethod
    def backward(ctx, grad):
        return comm.all_to_all(grad.contiguous(), ctx.group, "ulysses"), None


class _Permute(torch.autograd.Function):
    """Rows reordered by a permutation along dim 1: forward gathers with `order`, backward with its
    inverse (a gather too, not the scatter-add plain indexing's backward does)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.inverse = inverse
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(1, ctx.inverse), None, None


@functools.lru_cache(maxsize=64)  # the same for every layer of a step: built once per shape
def _row_orders(local_len: int, world: int, layout: str, device, lengths: tuple | None = None):
    """(positions, order) for rows gathered in rank order (each rank's shard in `layout`; packed
    sequences of `lengths` each sharded on their own): row j sits at sequence position positions[j],
    and rows[:, order] is the sequence in order (so ordered[:, positions] gives the rows back). None
    when they already are in order (one contiguous sequence)."""
    if layout == "contiguous" and lengths is None:
        return None
    seq = local_len * world
    cu = None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    positions = torch.cat([shard_positions(seq, r, world, layout, cu_seqlens=cu) for r in range(world)]).to(device)
    return positions, torch.argsort(positions)


def _to_heads(xs: list[torch.Tensor], group, world: int, orders) -> list[torch.Tensor]:
    """[b, n, h_i, d] sequence shards -> [b, P*n, h_i/P, d] whole sequences (in order) for this rank's
    heads, in one all-to-all: each destination's head slices of every tensor are packed together."""
    b, n, _, d = xs[0].shape
    widths = [x.shape[2] // world for x in xs]
    parts = torch.cat([x.reshape(b, n, world, w, d) for x, w in zip(xs, widths)], dim=3)  # [b, n, P, sum h/P, d]
    got = _AllToAll.apply(parts.permute(2, 0, 1, 3, 4).contiguous(), group)   # [P, b, n, sum h/P, d], slot j: rank j's rows
    full = got.permute(1, 0, 2, 3, 4).reshape(b, world * n, sum(widths), d)   # rank-major rows
    if orders is not None:
        full = _Permute.apply(full, orders[1], orders[0])
    return list(full.split(widths, dim=2))


def _to_sequence(x: torch.Tensor, group, world: int, orders) -> torch.Tensor:
    """The inverse of _to_heads: [b, P*n, h/P, d] (in order) -> [b, n, h, d] this rank's shard."""
    b, seq, hp, d = x.shape
    n = seq // world
    if orders is not None:
        x = _Permute.apply(x, orders[0], orders[1])  # back to rank-major rows
    parts = x.reshape(b, world, n, hp, d).permute(1, 0, 2, 3, 4)               # [P, b, n, h/P, d]
    got = _AllToAll.apply(parts.contiguous(), group)                           # slot j: head group j
    return got.permute(1, 2, 0, 3, 4).reshape(b, n, world * hp, d)


def _kv_heads_for(heads_q: int, heads_kv: int, world: int) -> int:
    """K/V heads to send: the fewest multiple of heads_kv that P divides, lcm(heads_kv, P); it divides
    heads_q because P and heads_kv both do (heads_kv itself when P divides it)."""
    return heads_kv * world // math.gcd(heads_kv, world)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, group=None,
                      layout: str = "zigzag", softmax_scale: float | None = None,
                      cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over a sequence sharded across `group` by head-scattering all-to-alls (see module doc).
    Inputs that differ across ranks, or heads_q not divisible by the group size: the same ValueError
    on every rank. cu_seqlens: packed sequences, as ring_attention takes them (attention never
    crosses sequences)."""
    import torch.distributed as dist

    from dist.ringattn import check_inputs

    if dist.is_initialized():
        rank, world = comm.group_rank(group), comm.group_size(group)
    else:
        if group is not None:
            raise ValueError("group: torch.distributed is not initialised")
        rank, world = 0, 1
    lengths = None if cu_seqlens is None else tuple(seq_lengths(cu_seqlens, world, layout))
    check_inputs(q, k, v, causal, None, layout, group, world, rank, what="ulysses_attention", lengths=lengths)
    varlen = {} if cu_seqlens is None else dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)
    if world == 1:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, **varlen)
    heads_q, heads_kv = q.shape[2], k.shape[2]
    if heads_q % world:  # shapes are equal on every rank now, so every rank raises this
        raise ValueError(f"ulysses_attention: heads_q ({heads_q}) must be divisible by the group size ({world}); "
                         "use a ring strategy (tokenring, ring, allgather) for this model")
    kv_heads = _kv_heads_for(heads_q, heads_kv, world)
    if kv_heads != heads_kv:
        k, v = (x.repeat_interleave(kv_heads // heads_kv, dim=2) for x in (k, v))
    orders = _row_orders(q.shape[1], world, layout, q.device, lengths)  # device: hashable torch.device
    qh, kh, vh = _to_heads([q, k, v], group, world, orders)
    out = attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, **varlen)
    return _to_sequence(out, group, world, orders)
