"""dist.comm: batched exchanges in both directions, the twin group, byte counters, collectives and
timeouts, against known values on gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks


def _exchange(rank, world):
    import torch.distributed as dist

    from dist import comm

    comm.counters.reset()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    twin = comm.twin_group()
    # a step of TokenRing's shape: a block to prev (tag 0) and a result to next (tag 1), both ways at once
    ex = comm.Exchange()
    to_prev = torch.full((3, 5), float(rank))
    to_next = torch.full((7,), 10.0 + rank)
    from_next, from_prev = torch.empty(3, 5), torch.empty(7)
    ex.send(to_prev, prv, "q").send(to_next, nxt, "out", tag=1)
    ex.recv(from_next, nxt).recv(from_prev, prv, tag=1)
    ex.start()
    ex.wait()
    # two streams between the same ranks, posted in different orders on the two sides, kept apart by tag
    a, b = torch.full((4,), 1.0 * rank), torch.full((2,), 100.0 * rank)
    ra, rb = torch.empty(4), torch.empty(2)
    first, second = comm.Exchange(), comm.Exchange()
    first.send(a, nxt, "a", tag=0).recv(rb, prv, tag=1)
    second.send(b, nxt, "b", tag=1).recv(ra, prv, tag=0)
    first.start()
    second.start()
    first.wait()
    second.wait()
    gathered = comm.all_gather(torch.tensor([rank]), None, "meta")
    spread = comm.all_to_all(torch.arange(world) + 10 * rank, None, "a2a")  # slice i goes to rank i
    return dict(from_next=from_next[0, 0].item(), from_prev=from_prev[0].item(), ra=ra[0].item(), rb=rb[0].item(),
                bytes=dict(comm.counters.bytes), twin_differs=twin is not dist.group.WORLD and twin is not None,
                ring=comm.group_ranks(), gathered=[int(x) for x in gathered], spread=spread.tolist())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_exchange_both_directions_and_counters(world):
    outs = run_ranks(_exchange, world, timeout_s=90)
    for rank, out in enumerate(outs):
        assert out["spread"] == [rank + 10 * j for j in range(world)]
        assert out["from_next"] == float((rank + 1) % world)
        assert out["from_prev"] == 10.0 + (rank - 1) % world
        assert out["ra"] == float((rank - 1) % world) and out["rb"] == 100.0 * ((rank - 1) % world)
        assert out["bytes"] == {"q": 15 * 4, "out": 7 * 4, "a": 16, "b": 8, "meta": (world - 1) * 8,
                                "a2a": (world - 1) * 8}
        assert out["twin_differs"]
        assert out["ring"] == list(range(world)) and out["gathered"] == list(range(world))


def _pairs(rank, world):
    """Sub-groups made with new_group_pair on every rank: members get a group and a distinct twin,
    and an exchange inside each pair of ranks carries data both ways."""
    from dist import comm

    mine = None
    for ranks in ([0, 1], [2, 3]):
        g, twin = comm.new_group_pair(ranks)
        if rank in ranks:
            mine = (g, twin)
        else:
            assert (g, twin) == (None, None)
    g, twin = mine
    assert twin is not g and comm.twin_group(g) is twin
    peer = 1 - comm.group_rank(g)
    got = torch.empty(3)
    comm.Exchange(g).send(torch.full((3,), float(rank)), peer).recv(got, peer).start().wait()
    return got[0].item()


@pytest.mark.timeout(120)
def test_group_pairs_on_four_ranks():
    assert run_ranks(_pairs, 4, timeout_s=90) == [1.0, 0.0, 3.0, 2.0]


def _late_sender(rank, world, delay_s):
    import time

    from dist import comm

    comm.twin_group()  # built on every rank first
    comm.counters.reset()
    ex = comm.Exchange()
    if rank == 0:
        time.sleep(delay_s)  # rank 1 waits for this message about delay_s
        ex.send(torch.ones(4), 1, "x")
    else:
        ex.recv(torch.empty(4), 0)
    ex.start()
    ex.wait()
    waited = comm.counters.wait_s
    comm.counters.reset()
    return waited, comm.counters.wait_s


@pytest.mark.timeout(60)
def test_counters_time_the_waits():
    (sender, _), (receiver, after_reset) = run_ranks(_late_sender, 2, 1.0, timeout_s=40)
    # the receiver waited for a message sent 1 s late: at least half of that is counted as waiting
    assert receiver > 0.5 and after_reset == 0.0
    assert sender < receiver


def _dead_peer(rank, world):
    from dist import comm

    comm.twin_group()  # both ranks
    if rank == 1:
        return None  # never sends
    ex = comm.Exchange()
    ex.recv(torch.empty(4), 1)
    ex.start()
    try:
        ex.wait()
    except RuntimeError as e:
        return str(e)[:200]
    return "no error"


@pytest.mark.timeout(60)
def test_dead_peer_raises_at_the_group_timeout_instead_of_hanging():
    out = run_ranks(_dead_peer, 2, timeout_s=40, collective_timeout_s=3)
    assert out[0] != "no error" and out[1] is None


def test_pack_rows_round_trip():
    from dist import comm

    a = torch.randn(2, 5, 3, 4)
    b = torch.randn(2, 5, 3).transpose(1, 2).transpose(1, 2)  # any strides
    c = torch.randn(2, 5, 6, dtype=torch.float64)
    spec = comm.row_spec([a, b, c])
    packed = comm.pack_rows([a, b, c])
    assert [p.dtype for p in packed] == [torch.float32, torch.float64]
    bufs = [torch.empty_like(p).copy_(p) for p in packed]  # as received
    for x, y in zip(comm.unpack_rows(bufs, spec), (a, b, c)):
        assert torch.equal(x, y)
