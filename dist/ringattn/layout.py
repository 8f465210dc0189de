"""Sequence layouts for ring attention: which tokens a rank holds, and which blocks it must compute.

Layouts (world = P ranks, global length S):
  contiguous: rank r holds tokens [r*S/P, (r+1)*S/P).
  zigzag:     the sequence is cut into 2P equal chunks; rank r holds chunks r and 2P-1-r (in that
              order). Under a causal mask every rank then does the same amount of work.

Which blocks each rank computes under a mask is the plan's (dist.plan.block), shared with the
performance model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist.plan import LAYOUTS


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(world: int, layout: str) -> int:
    return 2 * world if layout == "zigzag" else world


def check_length(seq_len: int, world: int, layout: str, what: str = "sequence length") -> None:
    """ValueError unless a global `seq_len` splits evenly over `world` ranks in `layout`."""
    check_layout(layout)
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    n = _chunks(world, layout)
    if seq_len % n:
        raise ValueError(f"{what} {seq_len} must be divisible by {n} for layout={layout!r} with {world} ranks "
                         f"(pad it to a multiple of {n})")


def seq_lengths(cu_seqlens, world: int, layout: str, total: int | None = None) -> list[int]:
    """Lengths of the packed sequences that `cu_seqlens` (int32 [n + 1], cumulative) describes, each
    checked to split evenly over `world` ranks in `layout`, and the last offset against `total`.
    Kept per tensor (cu_seqlens must not be modified in place): every layer of a step passes the same
    one, so only the first reads it back from the device."""
    key = (id(cu_seqlens), world, layout)
    hit = _LENGTHS.get(key)
    if hit is not None and hit[0] is cu_seqlens:
        lengths = hit[1]
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [n + 1] of cumulative sequence lengths")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu}")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        for i, n in enumerate(lengths):
            check_length(n, world, layout, what=f"packed sequence {i}: length")
        if len(_LENGTHS) > 64:
            _LENGTHS.clear()
        _LENGTHS[key] = (cu_seqlens, lengths)
    if total is not None and sum(lengths) != total:
        raise ValueError(f"cu_seqlens ends at {sum(lengths)} but the packed tensor holds {total} positions")
    return lengths


_LENGTHS: dict = {}


def shard(x: torch.Tensor, dim: int, rank: int, world: int, layout: str = "zigzag",
          cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor along `dim` (e.g. [batch, seq, ...] with dim=1).

    zigzag: chunks `rank` and `2*world-1-rank` of 2*world equal chunks, concatenated.
    contiguous: chunk `rank` of `world`. Length not divisible as needed: ValueError.
    Packed sequences (cu_seqlens, see `seq_lengths`): each sequence is split in the layout on its own
    and the rank's pieces are concatenated in sequence order.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if cu_seqlens is not None:
        lengths = seq_lengths(cu_seqlens, world, layout, x.shape[dim])
        return torch.cat([shard(piece, dim, rank, world, layout) for piece in x.split(lengths, dim)], dim=dim)
    check_length(x.shape[dim], world, layout)
    if layout == "contiguous":
        return x.chunk(world, dim)[rank].contiguous()
    chunks = x.chunk(2 * world, dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def unshard_list(shards: list[torch.Tensor], dim: int, layout: str = "zigzag",
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Reassemble the full tensor from every rank's shard (group order)."""
    check_layout(layout)
    world = len(shards)
    if cu_seqlens is not None:
        local = [n // world for n in seq_lengths(cu_seqlens, world, layout)]
        pieces = [s.split(local, dim) for s in shards]  # [rank][sequence]
        return torch.cat([unshard_list([pieces[r][i] for r in range(world)], dim, layout)
                          for i in range(len(local))], dim=dim)
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    halves = [s.chunk(2, dim) for s in shards]
    order = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(order, dim=dim)


def unshard(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag",
            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """All-gather every rank's shard along `dim` and return the full tensor (same on every rank).

    Not differentiable (for outputs, logits, checks). Shards must have equal shapes on all ranks.
    """
    check_layout(layout)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return x
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"unshard: zigzag shards have an even length along dim {dim}, got {x.shape[dim]}")
    if cu_seqlens is not None:
        seq_lengths(cu_seqlens, world, layout, x.shape[dim] * world)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_list(parts, dim, layout, cu_seqlens)


def shard_positions(seq_len: int, rank: int, world: int, layout: str = "zigzag",
                    device=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Indices into the full (packed) sequence (int64 [seq_len // world]) of the tokens a rank holds.
    For RoPE position ids of packed sequences, shard each sequence's own positions instead."""
    return shard(torch.arange(seq_len, device=device), 0, rank, world, layout, cu_seqlens)


def zigzag_positions(seq_len: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Positions of rank's zigzag shard of a `seq_len`-token sequence: chunks rank and 2*world-1-rank."""
    return shard_positions(seq_len, rank, world, "zigzag", device)
