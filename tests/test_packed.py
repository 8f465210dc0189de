"""Packed sequences (cu_seqlens) through shard/unshard, ring_attention (every strategy, both layouts)
and ulysses_attention on 1-4 gloo ranks, against per-sequence float64 attention on the unsharded
tensors: attention never crosses sequences, outputs and gradients match."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import HostReads, run_ranks
from tests.test_ring_attention import TOL, reference_attention



def lengths_for(world):
    """Three sequences of unequal lengths, each divisible by 2 x world (zigzag's chunks)."""
    return [6 * world, 2 * world, 8 * world]


def _packed_case(seed, lengths, hq, hkv, dim):
    """q, k, v packed [1, sum(lengths), heads, dim] and dout; the reference runs each sequence on its own."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, total, hq, dim, generator=g, requires_grad=True)
    k = torch.randn(1, total, hkv, dim, generator=g, requires_grad=True)
    v = torch.randn(1, total, hkv, dim, generator=g, requires_grad=True)
    dout = torch.randn(1, total, hq, dim, generator=g)
    refs = [reference_attention(a, b, c, True) for a, b, c in
            zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
    ref = torch.cat(refs, dim=1)
    (ref * dout.double()).sum().backward()
    return q, k, v, dout, ref.detach()


def _packed(rank, world, cases):
    from dist.ringattn import shard, unshard
    from dist.seqpar import sp_attention

    lengths = lengths_for(world)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    errs = {}
    for strategy, layout in cases:
        q, k, v, dout, ref = _packed_case(1, lengths, 4, 2, 8)
        mine = [shard(x.detach(), 1, rank, world, layout, cu_seqlens=cu).requires_grad_() for x in (q, k, v)]
        out = sp_attention(*mine, causal=True, strategy=strategy, layout=layout, cu_seqlens=cu)
        out.backward(shard(dout, 1, rank, world, layout, cu_seqlens=cu))
        err = (unshard(out.detach(), 1, None, layout, cu_seqlens=cu).double() - ref).abs().max().item()
        for full, part in zip((q, k, v), mine):
            err = max(err, (unshard(part.grad, 1, None, layout, cu_seqlens=cu).double() - full.grad).abs().max().item())
        errs[(strategy, layout)] = err
    return errs


CASES = [(s, lay) for s in ("tokenring", "ring", "allgather", "ulysses") for lay in ("zigzag", "contiguous")]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_sequences_match_per_sequence_attention(world):
    cases = [c for c in CASES if c[0] != "ulysses" or 4 % world == 0]  # ulysses: heads divisible by P
    for errs in run_ranks(_packed, world, cases, timeout_s=200):
        for case, err in errs.items():
            assert err < TOL, (case, err)


def test_shard_unshard_packed_round_trip_and_bad_lengths():
    from dist.ringattn import shard, unshard_list

    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)
    x = torch.arange(24)
    for layout in ("zigzag", "contiguous"):
        parts = [shard(x, 0, r, 2, layout, cu_seqlens=cu) for r in range(2)]
        assert torch.equal(unshard_list(parts, 0, layout, cu_seqlens=cu), x)
    # each sequence on its own: rank 0 of 2 (zigzag) holds chunks 0 and 3 of every sequence
    assert shard(x, 0, 0, 2, "zigzag", cu_seqlens=cu).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 21, 22, 23]
    with pytest.raises(ValueError, match="packed sequence 1"):
        shard(x, 0, 0, 2, "zigzag", cu_seqlens=torch.tensor([0, 8, 14, 24], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        shard(x, 0, 0, 2, "zigzag", cu_seqlens=torch.tensor([0, 8, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        shard(x, 0, 0, 2, "zigzag", cu_seqlens=torch.tensor([0, 8, 24]))


def _packed_mismatch(rank, world):
    from dist.ringattn import ring_attention

    lengths = [8, 8] if rank == 0 else [4, 12]
    cu = torch.tensor([0, lengths[0], 16], dtype=torch.int32)
    q = torch.randn(1, 8, 2, 4)
    try:
        ring_attention(q, q, q, cu_seqlens=cu)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.timeout(90)
def test_cu_seqlens_that_differ_across_ranks_fail_alike():
    for msg in run_ranks(_packed_mismatch, 2, timeout_s=60):
        assert msg is not None and "cu_seqlens" in msg, msg


def _packed_messages(rank, world, lengths_sets, strategies):
    """For each strategy and each set of packed lengths: the c10d ops of one steady-state call (forward
    and backward; the first call's input check is left out) and the error against per-sequence float64
    attention (lengths here leave TokenRing's own block in two parts on CPU)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from dist.ringattn import shard, unshard
    from dist.seqpar import sp_attention

    out = {}
    for strategy in strategies:
        for lengths in lengths_sets:
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            q, k, v, dout, ref = _packed_case(2, lengths, 4, 2, 8)
            mine = [shard(x.detach(), 1, rank, world, "zigzag", cu_seqlens=cu).requires_grad_() for x in (q, k, v)]
            d_mine = shard(dout, 1, rank, world, "zigzag", cu_seqlens=cu)

            def call():
                for x in mine:
                    x.grad = None
                o = sp_attention(*mine, causal=True, strategy=strategy, layout="zigzag", cu_seqlens=cu)
                o.backward(d_mine)
                return o

            call()
            with profile(activities=[ProfilerActivity.CPU]) as prof, HostReads() as reads:
                o = call()
            ops = dict(Counter(e.name for e in prof.events() if e.name.startswith("c10d::")))
            ops.update(Counter(name for name, _ in reads.calls))
            err = (unshard(o.detach(), 1, None, "zigzag", cu_seqlens=cu).double() - ref).abs().max().item()
            for full, part in zip((q, k, v), mine):
                err = max(err, (unshard(part.grad, 1, None, "zigzag", cu_seqlens=cu).double()
                                - full.grad).abs().max().item())
            out[(strategy, len(lengths))] = (ops, err)
    return out


@pytest.mark.timeout(120)
def test_packed_call_sends_one_pass_of_messages():
    """A packed call runs one pass of the strategy for all its sequences: the same messages (sends,
    receives, collectives) for four sequences as for one sequence of the same total length, and no
    read-back of cu_seqlens from the device (.tolist(): a host sync per kernel call on a GPU)."""
    world = 3
    one = [96 * world]
    four = [16 * world, 8 * world, 48 * world, 24 * world]
    per_rank = run_ranks(_packed_messages, world, [one, four], ("tokenring", "ring", "allgather"), timeout_s=100)
    for result in per_rank:
        for strategy in ("tokenring", "ring", "allgather"):
            ops_one, err_one = result[(strategy, 1)]
            ops_four, err_four = result[(strategy, 4)]
            assert err_one < TOL and err_four < TOL, (strategy, err_one, err_four)
            assert ops_one and ops_four == ops_one, (strategy, ops_one, ops_four)
            assert "tolist" not in ops_four and "item" not in ops_four, (strategy, ops_four)
