"""The "auto" policy: the strategy the model predicts fastest for one attention call on its group."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from dist.plan import RING_STRATEGIES, diag_tail

from .model import ComputeProfile, LinkProfile, Workload, default_compute, predict
from .topology import cluster


def choose_strategy(q_shape, k_shape, ranks: int | Sequence[int], *, causal: bool = True, layout: str = "zigzag",
                    itemsize: int = 4, device_type: str = "cpu", link: LinkProfile | None = None,
                    compute: ComputeProfile | None = None, candidates=RING_STRATEGIES) -> str:
    """The "auto" policy, for ring_attention and wrap_model alike: the strategy among `candidates` with
    the lowest modelled time (ties: fewest bytes, then the first candidate; tokenring leads the
    default ring strategies). Ulysses is a candidate only where the group size divides both head
    counts. The same answer on every rank (a pure function of the call's shapes and its group).

    q_shape: [batch, local_seq, heads_q, dim]; k_shape: [batch, local_seq, heads_kv, dim].
    ranks: the group's global ranks in ring order (an int n: ranks 0..n-1).
    link: the link of those ranks in the configured cluster (dist.sim.topology.cluster);
    compute: h100-bf16 for CUDA, cpu-1-thread otherwise.
    """
    ranks = tuple(range(ranks)) if isinstance(ranks, int) else tuple(ranks)
    world = len(ranks)
    if world == 1:
        return "tokenring"
    if q_shape[2] % world or k_shape[2] % world:
        candidates = tuple(c for c in candidates if c != "ulysses")
    link = link or cluster(device_type).link(ranks)
    compute = compute or default_compute(device_type)
    w = Workload(q_shape[0], q_shape[1], q_shape[2], k_shape[2], q_shape[3], world, causal, layout, itemsize,
                 diag_tail=diag_tail(device_type))
    return _fastest(w, link, compute, tuple(candidates))


@functools.lru_cache(maxsize=256)
def _fastest(w: Workload, link: LinkProfile, compute: ComputeProfile, candidates: tuple) -> str:
    """choose_strategy's pick, once per distinct call (every layer of a model asks with the same shapes)."""
    preds = [predict(s, w, link, compute) for s in candidates]
    best = min(preds, key=lambda p: (round(p.total_s, 9), p.bytes_per_rank))
    return best.strategy
