"""Sequence layouts for ring attention: which tokens a rank holds, and which blocks it must compute.

Layouts (world = P ranks, global length S):
  contiguous: rank r holds tokens [r*S/P, (r+1)*S/P).
  zigzag:     the sequence is cut into 2P equal chunks; rank r holds chunks r and 2P-1-r (in that
              order). Under a causal mask every rank then does the same amount of work.

A *block* is the attention of one rank's queries (owner a) with another rank's keys (holder b).
`block(a, b, ...)` says which part of it is non-empty under the mask; every strategy and the
performance model (dist.sim) use this one function, so they agree on work and on bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


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


def shard(x: torch.Tensor, dim: int, rank: int, world: int, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of a full-sequence tensor along `dim` (e.g. [batch, seq, ...] with dim=1).

    zigzag: chunks `rank` and `2*world-1-rank` of 2*world equal chunks, concatenated.
    contiguous: chunk `rank` of `world`. Length not divisible as needed: ValueError.
    """
    check_length(x.shape[dim], world, layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if layout == "contiguous":
        return x.chunk(world, dim)[rank].contiguous()
    chunks = x.chunk(2 * world, dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def unshard_list(shards: list[torch.Tensor], dim: int, layout: str = "zigzag") -> torch.Tensor:
    """Reassemble the full tensor from every rank's shard (group order)."""
    check_layout(layout)
    world = len(shards)
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    halves = [s.chunk(2, dim) for s in shards]
    order = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(order, dim=dim)


def unshard(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """All-gather every rank's shard along `dim` and return the full tensor (same on every rank).

    Not differentiable (for outputs, logits, checks). Shards must have equal shapes on all ranks.
    """
    check_layout(layout)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return x
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"unshard: zigzag shards have an even length along dim {dim}, got {x.shape[dim]}")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_list(parts, dim, layout)


def shard_positions(seq_len: int, rank: int, world: int, layout: str = "zigzag",
                    device=None) -> torch.Tensor:
    """Global position ids (int64 [seq_len // world]) of the tokens a rank holds, for RoPE."""
    return shard(torch.arange(seq_len, device=device), 0, rank, world, layout)


def zigzag_positions(seq_len: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Positions of rank's zigzag shard of a `seq_len`-token sequence: chunks rank and 2*world-1-rank."""
    return shard_positions(seq_len, rank, world, "zigzag", device)


@dataclass(frozen=True)
class Block:
    """Non-empty part of the attention of owner a's queries with holder b's keys.

    Local row indices: queries [q_start, local_len) of a's shard (always a suffix), keys
    [k_start, k_stop) of b's shard; `causal` True only for a == b (the diagonal: local order is
    global order there, so ordinary causal masking is exact), else the part is fully visible.
    """

    q_start: int
    k_start: int
    k_stop: int
    causal: bool


def block(a: int, b: int, local_len: int, layout: str, causal: bool) -> Block | None:
    """The part of block (queries of rank a, keys of rank b) that the mask keeps; None if nothing."""
    n = local_len
    if not causal:
        return Block(0, 0, n, False)
    if a == b:
        return Block(0, 0, n, True)
    if layout == "contiguous":
        return Block(0, 0, n, False) if a > b else None
    # zigzag: a holds chunks (a, 2P-1-a), b holds (b, 2P-1-b).
    #   a > b: both of a's chunks see b's first chunk entirely and none of its second one.
    #   a < b: only a's second chunk sees anything, and it sees both of b's chunks entirely.
    half = n // 2
    return Block(0, 0, half, False) if a > b else Block(half, 0, n, False)


def q_needed(a: int, b: int, local_len: int, layout: str, causal: bool) -> int:
    """First query row of rank a that holder b needs (local_len when it needs none)."""
    blk = block(a, b, local_len, layout, causal)
    return local_len if blk is None else blk.q_start


def diag_tail(device_type: str) -> float:
    """Fraction of its local rows that TokenRing leaves for the last part of its own block (computed
    while the last results travel back; see `diag_parts`): half on GPUs; 1/8 on CPU, where a larger
    second part costs more (smaller kernel calls, a longer merge) than the loopback transfer it hides."""
    return 0.5 if device_type == "cuda" else 0.125


def diag_parts(local_len: int, causal: bool, tail: float) -> list[tuple[int, int, int]]:
    """A rank's own (diagonal) block as parts (q_start, k_start, k_stop): query rows [q_start, n) with
    keys [k_start, k_stop), each needing no causal offset (top-left causal, or no mask).

    With m = n - round(tail * n), 0 < m < n: part 0 = every row with keys [0, m), part 1 = rows
    [m, n) with keys [m, n) (every row when not causal). Under a causal mask both are top-left causal
    blocks (a rank's own rows are in global order in both layouts), so a kernel runs each as one
    block. Else (tail 0) one part, the whole block.
    """
    n = local_len
    m = n - round(tail * n)
    if not 0 < m < n:
        return [(0, 0, n)]
    return [(0, 0, m), (m if causal else 0, m, n)]
