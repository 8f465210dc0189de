"""Ring attention on 1-4 gloo ranks against float64 single-device attention (outputs and gradients),
communication volume (TokenRing never sends K/V; bytes equal the analytic count and dist.sim's),
and bad input (the same ValueError on every rank, never a hang)."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import HostReads, run_ranks

TOL = 1e-4


def reference_attention(q, k, v, causal):
    """float64 softmax(q k^T / sqrt(d)) v over the full sequence; GQA by repeating k/v heads."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        n = q.shape[1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def reference_case(seed, batch, seq, hq, hkv, dim, causal):
    """Random q, k, v (leaves; their .grad holds the float64 reference gradients) and dout, with the
    float64 reference output, for one test case."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, hq, dim, generator=g, requires_grad=True)
    k = torch.randn(batch, seq, hkv, dim, generator=g, requires_grad=True)
    v = torch.randn(batch, seq, hkv, dim, generator=g, requires_grad=True)
    dout = torch.randn(batch, seq, hq, dim, generator=g)
    ref = reference_attention(q, k, v, causal)
    (ref * dout.double()).sum().backward()
    return q, k, v, dout, ref.detach()


def tokenring_zigzag_causal_bytes(rank, world, n, q_row, lse_row):
    """TokenRing bytes sent by `rank` (forward, backward) for causal zigzag, from the schedule's definition.

    Q_a is relayed towards prev; holder d needs all n rows of Q_a when a > d (a's chunks both follow
    d's first chunk) and only the second half when a < d. Rank r relays Q_r, Q_{r+1}, ..., Q_{r+P-2} to
    r-1 and returns to every other owner a the result rows it computed for Q_a.
    """
    need = lambda a, d: n if a > d else n // 2  # noqa: E731
    relayed = sum(need((rank + t) % world, (rank - 1) % world) for t in range(world - 1))
    returned = sum(need(a, rank) for a in range(world) if a != rank)
    fwd = relayed * q_row + returned * (q_row + lse_row)            # Q out; (out, lse) back
    bwd = relayed * (2 * q_row + 2 * lse_row) + returned * q_row    # (Q, dO, lse, D) out; dQ back
    return fwd, bwd


CASES = [  # (strategy, layout, causal, heads_q, heads_kv)
    *[(s, lay, c, 4, 2) for s in ("tokenring", "ring", "allgather") for lay in ("zigzag", "contiguous")
      for c in (True, False)],
    ("tokenring", "zigzag", True, 2, 2),
    ("auto", "zigzag", True, 4, 1),
]


def _correctness(rank, world):
    from dist import comm
    from dist.ringattn import ring_attention, shard
    from dist.sim import Workload, bytes_per_rank

    results = []
    batch, local, dim = 2, 8, 8
    seq = local * world
    for i, (strategy, layout, causal, hq, hkv) in enumerate(CASES):
        q, k, v, dout, ref = reference_case(i, batch, seq, hq, hkv, dim, causal)

        mine = [shard(x.detach(), 1, rank, world, layout).requires_grad_() for x in (q, k, v)]
        comm.counters.reset()
        out = ring_attention(*mine, causal=causal, strategy=strategy, layout=layout)
        fwd_bytes = dict(comm.counters.bytes)
        out.backward(shard(dout, 1, rank, world, layout))
        all_bytes = dict(comm.counters.bytes)

        err = (out.double() - shard(ref.detach(), 1, rank, world, layout)).abs().max().item()
        for full, part in zip((q, k, v), mine):
            err = max(err, (part.grad.double() - shard(full.grad, 1, rank, world, layout)).abs().max().item())
        sent = {key: val for key, val in all_bytes.items() if key != "meta"}
        w = Workload(batch, local, hq, hkv, dim, world, causal, layout, itemsize=4)
        model = {s: bytes_per_rank(s, w)[rank] for s in ("tokenring", "ring", "allgather")}
        model_fwd = {s: bytes_per_rank(s, w, backward=False)[rank] for s in ("tokenring", "ring", "allgather")}
        results.append(dict(case=(strategy, layout, causal, hq, hkv), err=err, sent=sent,
                            fwd=sum(v for key, v in fwd_bytes.items() if key != "meta"),
                            model=model, model_fwd=model_fwd,
                            analytic=tokenring_zigzag_causal_bytes(rank, world, local, batch * hq * dim * 4,
                                                                   batch * hq * 4)))
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_outputs_gradients_and_bytes(world):
    per_rank = run_ranks(_correctness, world, timeout_s=200)
    for rank, results in enumerate(per_rank):
        for res in results:
            strategy, layout, causal, hq, hkv = res["case"]
            assert res["err"] < TOL, (rank, res["case"], res["err"])
            total = sum(res["sent"].values())
            if world == 1:
                assert total == 0
                continue
            if strategy == "tokenring":
                assert res["sent"].get("kv", 0) == 0 and res["sent"].get("dkv", 0) == 0, res["sent"]
                assert set(res["sent"]) <= {"q", "out", "dq"}
                if layout == "zigzag" and causal:
                    fwd, bwd = res["analytic"]
                    assert res["fwd"] == fwd and total == fwd + bwd, (res["fwd"], total, fwd, bwd)
            if strategy in ("tokenring", "ring", "allgather"):
                assert total == res["model"][strategy], (res["case"], res["sent"], res["model"])
                assert res["fwd"] == res["model_fwd"][strategy]
            if strategy == "auto":
                assert total in res["model"].values()


def test_tokenring_sends_fewer_bytes_than_kv_ring_without_gqa():
    """Zigzag causal MHA: TokenRing moves 3/4 of Q + out per step where the KV ring moves K and V."""
    from dist.sim import Workload, bytes_per_rank

    for world in (2, 4, 8):
        w = Workload(1, 4096, 8, 8, 64, world, True, "zigzag", itemsize=2)
        assert max(bytes_per_rank("tokenring", w, backward=False)) < max(bytes_per_rank("ring", w, backward=False))
        assert max(bytes_per_rank("tokenring", w)) < max(bytes_per_rank("ring", w))


def _bad_inputs(rank, world):
    import torch.distributed as dist

    from dist.ringattn import ring_attention

    def attempt(**kw):
        q = kw.pop("q", torch.randn(1, 4, 2, 8))
        k = kw.pop("k", torch.randn(1, 4, 2, 8))
        try:
            ring_attention(q, k, k.clone(), **kw)
        except ValueError as e:
            return str(e)
        return None

    msgs = {}
    # one rank has a different local length
    msgs["shape"] = attempt(q=torch.randn(1, 6 if rank == 1 else 4, 2, 8), k=torch.randn(1, 6 if rank == 1 else 4, 2, 8))
    # odd local length for zigzag, on every rank
    msgs["odd"] = attempt(q=torch.randn(1, 3, 2, 8), k=torch.randn(1, 3, 2, 8))
    # unknown strategy on one rank only
    msgs["strategy"] = attempt(strategy="bogus" if rank == 0 else "tokenring")
    # unknown layout everywhere
    msgs["layout"] = attempt(layout="spiral")
    # heads not a multiple (one rank)
    msgs["gqa"] = attempt(q=torch.randn(1, 4, 3 if rank == 2 else 2, 8))
    # a group this rank does not belong to: ranks 0 and 1 run normally, rank 2 gets the error
    sub = dist.new_group([0, 1])
    msgs["group"] = attempt(group=sub)
    # everything still works afterwards
    out = ring_attention(torch.ones(1, 4, 2, 8), torch.ones(1, 4, 2, 8), torch.ones(1, 4, 2, 8))
    msgs["after"] = out.shape
    return msgs


@pytest.mark.timeout(120)
def test_bad_input_raises_on_every_rank():
    per_rank = run_ranks(_bad_inputs, 3, timeout_s=90, collective_timeout_s=30)
    for rank, msgs in enumerate(per_rank):
        assert "rank 1" in msgs["shape"] and "q shape" in msgs["shape"], msgs["shape"]
        assert "even local sequence length" in msgs["odd"]
        assert "strategy" in msgs["strategy"] and "rank 0" in msgs["strategy"]
        assert "layout" in msgs["layout"]
        assert "multiple of heads" in msgs["gqa"] and "rank 2" in msgs["gqa"]
        if rank == 2:
            assert "not a member" in msgs["group"]
        else:
            assert msgs["group"] is None
        assert tuple(msgs["after"]) == (1, 4, 2, 8)


def test_single_process_without_distributed():
    """No process group at all: ring_attention is plain attention (world size 1), "auto" too."""
    from dist.ringattn import ring_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    ref = reference_attention(q, k, v, True)
    for strategy in ("tokenring", "auto"):
        out = ring_attention(q, k, v, causal=True, strategy=strategy)
        assert (out.double() - ref).abs().max() < TOL
    with pytest.raises(ValueError, match="strategy"):
        ring_attention(q, k, v, strategy="nope")


def _profiled_calls(rank, world, strategies, calls):
    """Counts of collectives/point-to-point ops (c10d::*) and host syncs (.item() / .tolist() calls) over
    the first call of each strategy and over `calls` repeats after it."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from dist.seqpar import sp_attention

    def count(prof, reads):
        return dict(Counter([e.name for e in prof.events() if e.name.startswith("c10d::")]
                            + [name for name, _ in reads.calls]))

    out = {}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    for strategy in strategies:
        def call():
            sp_attention(q, k, v, causal=True, strategy=strategy).sum().backward()

        with profile(activities=[ProfilerActivity.CPU]) as first, HostReads() as first_reads:
            call()
        with profile(activities=[ProfilerActivity.CPU]) as steady, HostReads() as steady_reads:
            for _ in range(calls):
                call()
        out[strategy] = (count(first, first_reads), count(steady, steady_reads))
    return out


@pytest.mark.timeout(120)
def test_steady_state_calls_add_no_collective_and_no_host_sync():
    """A call whose signature was seen before runs only the strategy's own messages: no input-check
    all-gather, no .item()/.tolist(). The first call shows the check (one all-gather) the others skip."""
    calls = 3
    for per_rank in run_ranks(_profiled_calls, 2, ("tokenring", "ring", "allgather", "ulysses"), calls,
                              timeout_s=90):
        for strategy, (first, steady) in per_rank.items():
            assert first.get("c10d::allgather_", 0) == 1 + (strategy == "allgather"), (strategy, first)
            assert "tolist" not in steady and "item" not in steady, (strategy, steady)
            own = {"tokenring": {}, "ring": {},
                   "allgather": {"c10d::allgather_": calls, "c10d::alltoall_base_": calls},
                   "ulysses": {"c10d::alltoall_base_": 4 * calls}}[strategy]  # ulysses: q/k/v and out, and back
            collectives = {name: n for name, n in steady.items() if name.startswith("c10d::")
                           and name not in ("c10d::send", "c10d::recv_")}
            assert collectives == own, (strategy, steady)
            p2p = steady.get("c10d::send", 0) + steady.get("c10d::recv_", 0)
            assert (p2p > 0) == (strategy in ("tokenring", "ring")), (strategy, steady)


def _subgroups(rank, world):
    """Two sequence-parallel groups {0, 2} and {1, 3} (as in a dp x sp mesh), each with its own sequence."""
    import torch.distributed as dist

    from dist.ringattn import ring_attention, shard

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group, sp_rank = groups[rank % 2], rank // 2
    errs = []
    for strategy in ("tokenring", "ring", "allgather"):
        g = torch.Generator().manual_seed(rank % 2)  # the two groups see different sequences
        q, k, v, dout = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(4))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        ref = reference_attention(q, k, v, True)
        (ref * dout.double()).sum().backward()
        mine = [shard(x.detach(), 1, sp_rank, 2, "zigzag").requires_grad_() for x in (q, k, v)]
        out = ring_attention(*mine, group=group, strategy=strategy)
        out.backward(shard(dout, 1, sp_rank, 2, "zigzag"))
        err = (out.double() - shard(ref.detach(), 1, sp_rank, 2, "zigzag")).abs().max().item()
        for full, part in zip((q, k, v), mine):
            err = max(err, (part.grad.double() - shard(full.grad, 1, sp_rank, 2, "zigzag")).abs().max().item())
        errs.append(err)
    return errs


@pytest.mark.timeout(120)
def test_sequence_parallel_subgroups():
    for errs in run_ranks(_subgroups, 4, timeout_s=90):
        assert max(errs) < TOL, errs
