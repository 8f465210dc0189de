"""The strategy registry and the block/relay plan of ring attention.

One place for what the implementation (dist.ringattn, dist.seqpar) executes and the performance model
(dist.sim) replays, so names, work and bytes agree by construction. Pure Python, no torch.

Strategies:
    tokenring  Q travels one way round the ring, partial outputs (out, LSE) straight back; KV stays.
    ring       KV travels round the ring (dK/dV accumulators follow in backward).
    allgather  all-gather KV, compute locally; dK/dV go back by one all-to-all.
    ulysses    all-to-all from sequence shards to head shards and back (dist.seqpar).
    auto       the one the model (dist.sim.choose_strategy) predicts fastest for the call.

Plan (world = P ranks in ring order, n local rows, layout "zigzag" or "contiguous"): `block(a, b)` is
the part of the attention of owner a's queries with holder b's keys that the causal mask keeps,
`relay_start(a, holder)` the first of a's query rows TokenRing still carries after `holder`, and
`diag_parts` splits a rank's own block so TokenRing can hide its last return behind the second part.
"""

from __future__ import annotations

from dataclasses import dataclass

RING_STRATEGIES = ("tokenring", "ring", "allgather")  # ring_attention's own
SP_STRATEGIES = (*RING_STRATEGIES, "ulysses")          # what wrap_model runs
STRATEGY_CHOICES = (*SP_STRATEGIES, "auto")            # what a user may name (sp.strategy)
RING_CHOICES = (*RING_STRATEGIES, "auto")              # what ring_attention accepts
LAYOUTS = ("zigzag", "contiguous")


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


def relay_start(a: int, holder: int, world: int, local_len: int, layout: str, causal: bool) -> int:
    """First row of Q_a that `holder` forwards towards prev in TokenRing: what its remaining visitors
    need. Q_a visits holder-1, holder-2, ... until it would reach a again."""
    start, d = local_len, (holder - 1) % world
    while d != a:
        start = min(start, q_needed(a, d, local_len, layout, causal))
        d = (d - 1) % world
    return start


def diag_tail(device_type: str) -> float:
    """Fraction of its local rows that TokenRing leaves for the last part of its own block (computed
    while the last results travel back; see `diag_parts`): half on GPUs; 1/8 on CPU, where a larger
    second part costs more (smaller kernel calls, a longer merge) than the transfer it hides."""
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
