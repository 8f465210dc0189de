"""dist.comm: batched exchanges in both directions, the twin group, byte counters, timeouts."""

from __future__ import annotations

import time

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
    return dict(from_next=from_next[0, 0].item(), from_prev=from_prev[0].item(), ra=ra[0].item(), rb=rb[0].item(),
                bytes=dict(comm.counters.bytes), twin_differs=twin is not dist.group.WORLD and twin is not None,
                ring=comm.group_ranks(), gathered=[int(x) for x in gathered])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3])
def test_exchange_both_directions_and_counters(world):
    for rank, out in enumerate(run_ranks(_exchange, world, timeout_s=60)):
        assert out["from_next"] == float((rank + 1) % world)
        assert out["from_prev"] == 10.0 + (rank - 1) % world
        assert out["ra"] == float((rank - 1) % world) and out["rb"] == 100.0 * ((rank - 1) % world)
        assert out["bytes"] == {"q": 15 * 4, "out": 7 * 4, "a": 16, "b": 8, "meta": (world - 1) * 8}
        assert out["twin_differs"]
        assert out["ring"] == list(range(world)) and out["gathered"] == list(range(world))


def _dead_peer(rank, world):
    import os

    from dist import comm

    os.environ["DIST_COMM_TIMEOUT_S"] = "2"
    ex = comm.Exchange()  # both ranks: creates the twin group
    if rank == 1:
        return None  # never sends
    ex.recv(torch.empty(4), 1)
    ex.start()
    t0 = time.monotonic()
    try:
        ex.wait()
    except RuntimeError as e:
        return time.monotonic() - t0, str(e)[:200]
    return "no error"


@pytest.mark.timeout(60)
def test_dead_peer_times_out_instead_of_hanging():
    out = run_ranks(_dead_peer, 2, timeout_s=40, collective_timeout_s=30)
    elapsed, msg = out[0]
    assert elapsed < 15, (elapsed, msg)


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
