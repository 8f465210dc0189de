"""Ring attention: attention over a sequence sharded across a process group.

    from dist.ringattn import ring_attention, shard, unshard, zigzag_positions

    q_local = shard(q, 1, rank, world, "zigzag")            # [batch, seq / world, heads_q, dim]
    out_local = ring_attention(q_local, k_local, v_local, causal=True, group=None,
                               strategy="tokenring", layout="zigzag")
    out = unshard(out_local, 1, group, "zigzag")              # == attention(q, k, v)

Strategies (names and plan in dist.plan, implementations in strategies.py): "tokenring" (Q and
partial outputs travel in opposite directions, KV stays), "ring" (KV ring), "allgather" (all-gather
KV, reduce-scatter dK/dV), "auto" (the one dist.sim.choose_strategy predicts fastest).

Inputs are checked on every rank and against every other rank the first time a call signature
(shapes, dtypes, device, causal, strategy, layout, group) is seen; later calls with that signature
add no collective and no host sync (`set_input_checks("always")` checks every call, for debugging).
"""

from __future__ import annotations

import logging
import math

import torch

from dist import comm
from dist.plan import LAYOUTS, RING_CHOICES, block, diag_parts, diag_tail

from .layout import seq_lengths, shard, shard_positions, unshard, unshard_list, zigzag_positions
from .strategies import STRATEGIES, RingSpec

__all__ = ["ring_attention", "check_inputs", "set_input_checks", "shard", "unshard", "unshard_list", "seq_lengths",
           "zigzag_positions", "shard_positions", "block", "diag_parts", "diag_tail", "LAYOUTS"]

log = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Problems one rank can find on its own, by code; they are exchanged so every rank raises the same error.
_LOCAL_PROBLEMS = {
    1: "q, k and v must be 4-D tensors [batch, seq, heads, dim]",
    2: "k and v must have the same shape",
    3: "q and k must agree in batch, local sequence length and head_dim",
    4: "heads of q must be a multiple of heads of k/v (GQA)",
    5: "q, k and v must have one floating dtype",
    6: "layout='zigzag' needs an even local sequence length (two chunks per rank); pad the global "
       "sequence to a multiple of 2 * world size",
    7: f"strategy must be one of {RING_CHOICES}",
    8: f"layout must be one of {LAYOUTS}",
    9: "local sequence length must be > 0",
    10: "cu_seqlens (packed sequences) needs batch 1 and lengths that sum to world x the local length",
}

_CHECKED: dict = {}  # call signatures whose inputs every rank of the group has agreed on (insertion-ordered)
_CHECK_ALWAYS = False


def set_input_checks(mode: str) -> None:
    """"once" (default): check inputs across ranks once per call signature; "always": on every call."""
    global _CHECK_ALWAYS
    if mode not in ("once", "always"):
        raise ValueError(f"input checks must be 'once' or 'always', got {mode!r}")
    _CHECK_ALWAYS = mode == "always"


def _local_problem(q, k, v, strategy, layout, world, lengths=None) -> int:
    if strategy is not None and strategy not in RING_CHOICES:
        return 7
    if layout not in LAYOUTS:
        return 8
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        return 1
    if k.shape != v.shape:
        return 2
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        return 3
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return 4
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return 5
    if q.shape[1] == 0:
        return 9
    if layout == "zigzag" and world > 1 and q.shape[1] % 2:
        return 6
    if lengths is not None and (q.shape[0] != 1 or sum(lengths) != world * q.shape[1]):
        return 10
    return 0


def _shape_of(t) -> list[int]:
    return list(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else [-1] * 4


def _signature(q, k, v, causal, strategy, layout, group, lengths) -> tuple:
    shapes = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in (q, k, v))
    return (shapes, bool(causal), strategy, layout, group, lengths)


def check_inputs(q, k, v, causal, strategy, layout, group, world, rank, what="ring_attention",
                 lengths: tuple | None = None) -> None:
    """Check inputs on this rank and against every other rank of `group`; the same ValueError on all
    ranks. Once per call signature (see the module doc): a signature every rank agreed on before
    returns at once. strategy None: nothing to check there (dist.seqpar's Ulysses); `what` names the
    caller in messages; `lengths`: the packed sequences' lengths (cu_seqlens), the same on every rank."""
    key = (what, world, _signature(q, k, v, causal, strategy, layout, group, lengths))
    if key in _CHECKED and not _CHECK_ALWAYS:
        return
    _check_inputs(q, k, v, causal, strategy, layout, group, world, rank, what, lengths)
    if len(_CHECKED) >= 4096:  # packed batches bring new signatures every step: keep the newest
        del _CHECKED[next(iter(_CHECKED))]
    _CHECKED[key] = True


def _check_inputs(q, k, v, causal, strategy, layout, group, world, rank, what, lengths) -> None:
    code = _local_problem(q, k, v, strategy, layout, world, lengths)
    dtype_code = _DTYPES.index(q.dtype) if isinstance(q, torch.Tensor) and q.dtype in _DTYPES else -1
    strategy_code = RING_CHOICES.index(strategy) if strategy in RING_CHOICES else -1
    layout_code = LAYOUTS.index(layout) if layout in LAYOUTS else -1
    packed = -1 if lengths is None else hash(tuple(lengths)) & (2**62 - 1)  # ints hash alike in every process
    row = [code, *_shape_of(q), *_shape_of(k), dtype_code, int(bool(causal)), strategy_code, layout_code, packed]
    if world == 1:
        rows = [row]
    else:
        device = q.device if isinstance(q, torch.Tensor) else "cpu"
        t = torch.tensor(row, dtype=torch.int64, device=device)
        rows = [x.tolist() for x in comm.all_gather(t, group, "meta")]
    for r, other in enumerate(rows):
        if other[0]:
            detail = f" (q {tuple(other[1:5])}, k {tuple(other[5:9])})" if other[0] in (1, 2, 3, 4, 6, 9) else ""
            extra = f", got {strategy!r}" if other[0] == 7 and r == rank else ""
            extra += f", got {layout!r}" if other[0] == 8 and r == rank else ""
            raise ValueError(f"{what}: on rank {r} of the group: {_LOCAL_PROBLEMS[other[0]]}{detail}{extra}")
    names = ["q shape", "k/v shape", "dtype", "causal", "strategy", "layout", "cu_seqlens"]
    spans = [(1, 5), (5, 9), (9, 10), (10, 11), (11, 12), (12, 13), (13, 14)]
    for name, (lo, hi) in zip(names, spans):
        values = [tuple(r[lo:hi]) for r in rows]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {i}: {v if hi - lo > 1 else v[0]}" for i, v in enumerate(values))
            raise ValueError(f"{what}: every rank of the group must pass the same {name}; got {shown}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, group=None,
                   strategy: str = "tokenring", layout: str = "zigzag",
                   softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over a sequence sharded across `group` (every rank of the group calls it).

    q: [batch, local_seq, heads_q, dim]; k, v: [batch, local_seq, heads_kv, dim] (heads_q a
    multiple of heads_kv): this rank's shard in `layout` (see `shard`). Returns out
    [batch, local_seq, heads_q, dim], this rank's shard of attention(q, k, v) over the full
    sequence; differentiable in q, k and v. Inputs that differ across ranks or cannot be split as
    the layout needs raise the same ValueError on every rank.

    cu_seqlens: packed sequences (int32 [n + 1], cumulative lengths in the full packed tensor, the same
    on every rank; batch 1), each sharded in the layout on its own (`shard(..., cu_seqlens=cu)`):
    attention never crosses sequences. One pass of the strategy carries every sequence: at each step
    all sequences stand in the same block relation, so its messages and kernel calls cover them all.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        rank = comm.group_rank(group)  # ValueError when this rank is not in `group`
        world = comm.group_size(group)
    else:
        if group is not None:
            raise ValueError("group: torch.distributed is not initialised")
        world, rank = 1, 0
    lengths = None if cu_seqlens is None else tuple(seq_lengths(cu_seqlens, world, layout))
    check_inputs(q, k, v, causal, strategy, layout, group, world, rank, lengths=lengths)
    if strategy == "auto":
        from dist.sim import choose_strategy

        ranks = comm.group_ranks(group) if world > 1 else 1  # global ranks: where they are picks the link
        strategy = choose_strategy(q.shape, k.shape, ranks, causal=causal, layout=layout,
                                   itemsize=q.element_size(), device_type=q.device.type)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    local = [q.shape[1]] if lengths is None else [n // world for n in lengths]
    key = (group, world, rank, layout, bool(causal), scale, tuple(local), q.device, diag_tail(q.device.type))
    spec = _SPECS.get(key)
    if spec is None:  # blocks and row sets of this signature, built once
        if len(_SPECS) >= 256:
            del _SPECS[next(iter(_SPECS))]
        spec = _SPECS[key] = RingSpec(group, world, rank, layout, causal, scale, local, q.device, key[-1])
    return STRATEGIES[strategy].apply(q.contiguous(), k.contiguous(), v.contiguous(), spec)


_SPECS: dict = {}  # RingSpec per call signature (insertion-ordered, the oldest dropped first)
