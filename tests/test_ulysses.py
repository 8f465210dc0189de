"""Ulysses (dist.seqpar.ulysses_attention) on 2 and 4 gloo ranks against float64 single-device
attention (outputs and gradients), its bytes against dist.sim's "ulysses" schedule, GQA head
repetition, and bad input (the same ValueError on every rank)."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks
from tests.test_ring_attention import TOL, reference_case

CASES = {  # world -> [(layout, causal, heads_q, heads_kv)]
    2: [("zigzag", True, 4, 2), ("contiguous", False, 4, 4), ("zigzag", True, 4, 1), ("contiguous", True, 2, 2)],
    4: [("zigzag", True, 8, 2), ("contiguous", True, 4, 4), ("zigzag", False, 8, 8)],
}


def _correctness(rank, world):
    from dist import comm
    from dist.ringattn import shard
    from dist.seqpar import ulysses_attention
    from dist.seqpar.ulysses import _kv_heads_for
    from dist.sim import Workload, bytes_per_rank

    results = []
    batch, local, dim = 2, 6, 8
    seq = local * world
    for i, (layout, causal, hq, hkv) in enumerate(CASES[world]):
        q, k, v, dout, ref = reference_case(i, batch, seq, hq, hkv, dim, causal)

        mine = [shard(x.detach(), 1, rank, world, layout).requires_grad_() for x in (q, k, v)]
        comm.counters.reset()
        out = ulysses_attention(*mine, causal=causal, layout=layout)
        out.backward(shard(dout, 1, rank, world, layout))
        sent = sum(b for key, b in comm.counters.bytes.items() if key != "meta")
        err = (out.double() - shard(ref.detach(), 1, rank, world, layout)).abs().max().item()
        for full, part in zip((q, k, v), mine):
            err = max(err, (part.grad.double() - shard(full.grad, 1, rank, world, layout)).abs().max().item())
        sent_kv = _kv_heads_for(hq, hkv, world)  # K/V heads that travel (repeated when P does not divide hkv)
        model = bytes_per_rank("ulysses", Workload(batch, local, hq, sent_kv, dim, world, causal, layout, 4))[rank]
        results.append(dict(case=(layout, causal, hq, hkv), err=err, sent=sent, model=model, kv=sent_kv))
    return results


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_outputs_gradients_and_bytes(world):
    for rank, results in enumerate(run_ranks(_correctness, world, timeout_s=150)):
        for res in results:
            assert res["err"] < TOL, (rank, res["case"], res["err"])
            assert res["sent"] == res["model"], (rank, res["case"], res["sent"], res["model"])
            _, _, hq, hkv = res["case"]
            assert res["kv"] % world == 0 and hq % res["kv"] == 0 and res["kv"] >= hkv


def _bad_heads(rank, world):
    from dist.seqpar import ulysses_attention

    q = torch.randn(1, 4, 6, 8)  # 6 query heads cannot be split over 4 ranks
    k = v = torch.randn(1, 4, 2, 8)
    try:
        ulysses_attention(q, k, v)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.timeout(120)
def test_heads_not_divisible_fail_alike_on_every_rank():
    errors = run_ranks(_bad_heads, 4, timeout_s=90)
    assert errors[0] is not None and "divisible by the group size" in errors[0]
    assert len(set(errors)) == 1


def test_config_rejects_ulysses_with_indivisible_heads():
    from dist.config import ConfigError, load_config

    load_config(None, ["sp.strategy=ulysses", "sp.degree=2"])  # tiny: 4 heads
    with pytest.raises(ConfigError, match="ulysses"):
        load_config(None, ["sp.strategy=ulysses", "sp.degree=8"])
