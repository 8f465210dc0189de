"""dist.comm: batched exchanges in both directions, the twin group, byte counters, timeouts, and the
shared-memory transport between ranks of one host (against gloo and against known values)."""

from __future__ import annotations

import os
import subprocess
import sys
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
    spread = comm.all_to_all(torch.arange(world) + 10 * rank, None, "a2a")  # slice i goes to rank i
    return dict(from_next=from_next[0, 0].item(), from_prev=from_prev[0].item(), ra=ra[0].item(), rb=rb[0].item(),
                bytes=dict(comm.counters.bytes), twin_differs=twin is not dist.group.WORLD and twin is not None,
                ring=comm.group_ranks(), gathered=[int(x) for x in gathered], spread=spread.tolist(),
                shm_peers=comm.shm_peers())


def _late_sender(rank, world, delay_s):
    import time

    from dist import comm

    comm.Exchange()  # the first Exchange builds the twin group on every rank
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
@pytest.mark.parametrize("shm", ["1", "0"])
def test_counters_time_the_waits(shm):
    (sender, _), (receiver, after_reset) = run_ranks(_late_sender, 2, 0.3, timeout_s=40, env={"DIST_SHM": shm})
    assert 0.25 < receiver < 5.0, receiver
    assert sender < 0.25 and after_reset == 0.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world,shm", [(2, "1"), (3, "1"), (3, "0")])
def test_exchange_both_directions_and_counters(world, shm):
    outs = run_ranks(_exchange, world, timeout_s=60, env={"DIST_SHM": shm})
    for rank, out in enumerate(outs):
        assert out["shm_peers"] == ([r for r in range(world) if r != rank] if shm == "1" else [])
        assert out["spread"] == [rank + 10 * j for j in range(world)]
        assert out["from_next"] == float((rank + 1) % world)
        assert out["from_prev"] == 10.0 + (rank - 1) % world
        assert out["ra"] == float((rank - 1) % world) and out["rb"] == 100.0 * ((rank - 1) % world)
        assert out["bytes"] == {"q": 15 * 4, "out": 7 * 4, "a": 16, "b": 8, "meta": (world - 1) * 8,
                                "a2a": (world - 1) * 8}
        assert out["twin_differs"]
        assert out["ring"] == list(range(world)) and out["gathered"] == list(range(world))


def _dead_peer(rank, world, limit="2"):
    from dist import comm

    if limit:
        os.environ["DIST_COMM_TIMEOUT_S"] = limit
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
@pytest.mark.parametrize("shm", ["1", "0"])
def test_dead_peer_times_out_instead_of_hanging(shm):
    out = run_ranks(_dead_peer, 2, timeout_s=40, collective_timeout_s=30, env={"DIST_SHM": shm})
    elapsed, msg = out[0]
    assert elapsed < 15, (elapsed, msg)


@pytest.mark.timeout(60)
def test_shared_memory_notices_a_peer_that_exited():
    """No DIST_COMM_TIMEOUT_S and a 30 s group timeout: the peer's exit is seen within seconds."""
    out = run_ranks(_dead_peer, 2, None, timeout_s=40, collective_timeout_s=30, env={"DIST_SHM": "1"})
    elapsed, msg = out[0]
    assert elapsed < 10 and "exited" in msg, (elapsed, msg)


def _streams(rank, world, sizes):
    """Messages larger than the ring (DIST_SHM_MB is tiny here) in both directions at once, three
    streams per pair posted in opposite orders on the two sides, several exchanges in flight, waited
    in reverse order; every value is checked on the receiver against the sender's generator."""
    from dist import comm

    def payload(src, dst, tag, n, dtype):
        g = torch.Generator().manual_seed(1000 * src + 10 * dst + tag)
        return (torch.randn(n, generator=g) * 100).to(dtype)

    peers = [r for r in range(world) if r != rank]
    dtypes = {0: torch.float32, 1: torch.bfloat16, 2: torch.int64}
    pending, checks = [], []
    for step, n in enumerate(sizes):
        ex = comm.Exchange()
        tags = [0, 1, 2] if rank % 2 == 0 else [2, 1, 0]
        for peer in peers:
            for tag in tags:
                ex.send(payload(rank, peer, tag, n + step, dtypes[tag]), peer, tag=tag)
            for tag in reversed(tags):
                buf = torch.empty(n + step, dtype=dtypes[tag])
                ex.recv(buf, peer, tag=tag)
                checks.append((buf, payload(peer, rank, tag, n + step, dtypes[tag])))
        pending.append(ex.start())
    for ex in reversed(pending):
        ex.wait()
    bad = sum(int(not torch.equal(got, want)) for got, want in checks)
    token = comm.Exchange()._shm_key
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(f"dist-{token:x}-")]
    return dict(bad=bad, n=len(checks), shm=comm.shm_peers(), leftovers=leftovers)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_streams_larger_than_the_ring(world):
    sizes = [300_000, 5, 70_001, 0, 123_457]  # float32 300k = 1.2 MB > the 256 KiB ring
    outs = run_ranks(_streams, world, sizes, timeout_s=90, env={"DIST_SHM": "1", "DIST_SHM_MB": "0.25"})
    for rank, out in enumerate(outs):
        assert out["shm"] == [r for r in range(world) if r != rank]
        assert out["n"] == 3 * (world - 1) * len(sizes) and out["bad"] == 0, out
        assert out["leftovers"] == []  # the rings are unlinked once both sides mapped them


def _size_mismatch(rank, world):
    from dist import comm

    ex = comm.Exchange()
    if rank == 0:
        ex.send(torch.zeros(8), 1)
    else:
        ex.recv(torch.zeros(4), 0)
    try:
        ex.start().wait()
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(60)
def test_shared_memory_size_mismatch_is_an_error():
    out = run_ranks(_size_mismatch, 2, timeout_s=40, env={"DIST_SHM": "1", "DIST_COMM_TIMEOUT_S": "5"})
    assert "32 bytes" in out[1] and "16 bytes" in out[1], out[1]


def test_host_key_differs_across_network_namespaces():
    """Testbed hosts are network namespaces on one machine: they must not share memory rings."""
    from dist.comm import _host_key

    code = "from dist.comm import _host_key; print(_host_key())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert int(same.stdout) == _host_key()
    other = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=root, timeout=60)
    if other.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {other.stderr.strip()[:200]}")
    assert int(other.stdout) != _host_key()


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


def _blocked_elsewhere(rank, world):
    """A message 4x the ring, and the receiver in a barrier before it waits for it: gloo finishes
    such sends in the background, and so must the shared-memory transport (its helper thread)."""
    import torch.distributed as dist

    from dist import comm

    ex = comm.Exchange()
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB through a 1 MiB ring
    got = torch.empty_like(big)
    ex.send(big, 1) if rank == 0 else ex.recv(got, 0)
    ex.start()
    if rank == 0:
        ex.wait()
        dist.barrier()
    else:
        dist.barrier()
        ex.wait()
    return bool(ex._shm_peers) and (rank == 0 or torch.equal(got, big))


@pytest.mark.timeout(60)
def test_shared_memory_moves_while_the_rank_is_blocked_elsewhere():
    outs = run_ranks(_blocked_elsewhere, 2, timeout_s=40, collective_timeout_s=20,
                     env={"DIST_SHM": "1", "DIST_SHM_MB": "1", "DIST_COMM_TIMEOUT_S": "15"})
    assert outs == [True, True]


def _fallback_agreed(rank, world):
    """Ranks 0-1 built their rings in an earlier group; in the world group rank 1 cannot allocate its
    ring to rank 2. Every pair must agree on its transport, and collectives on theirs."""
    import torch.distributed as dist

    from dist import comm

    pair = dist.new_group([0, 1])
    if rank < 2:
        comm.Exchange(pair)
    if rank == 1:
        comm._shm_capacity = lambda segments: 1 << 50  # posix_fallocate fails: the designed fallback
    ex = comm.Exchange()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    got = torch.zeros(4)
    ex.send(torch.arange(4.0) + rank, nxt).recv(got, prv).start().wait()
    gathered = comm.all_gather(torch.tensor([rank]), None, "meta")
    return sorted(ex._shm_peers), ex._shm_whole, got.tolist(), [int(x) for x in gathered]


@pytest.mark.timeout(60)
def test_shared_memory_fallback_is_agreed_by_both_ends():
    outs = run_ranks(_fallback_agreed, 3, timeout_s=40, collective_timeout_s=20,
                     env={"DIST_SHM": "1", "DIST_COMM_TIMEOUT_S": "10"})
    assert [o[0] for o in outs] == [[1, 2], [0], [0]]  # 0-1 kept their rings, 1-2 fell back to gloo
    for rank, (_, whole, got, gathered) in enumerate(outs):
        assert not whole and gathered == [0, 1, 2]
        assert got == [float(x + (rank - 1) % 3) for x in range(4)]


def _dies_in_setup(rank, world):
    import torch.distributed as dist

    from dist import comm

    real, calls = dist.all_gather, [0]

    def all_gather(*a, **k):  # twin group's count, setup's info, then setup's flags: rank 0 dies there
        calls[0] += 1
        if rank == 0 and calls[0] == 3:
            os._exit(3)
        return real(*a, **k)

    dist.all_gather = all_gather
    try:
        comm.Exchange()
    except RuntimeError:
        pass
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("dist-"))


@pytest.mark.timeout(60)
def test_shared_memory_rings_do_not_outlive_a_failed_setup():
    before = {f for f in os.listdir("/dev/shm") if f.startswith("dist-")}
    with pytest.raises(RuntimeError, match="rank 0 exited"):
        run_ranks(_dies_in_setup, 2, timeout_s=40, collective_timeout_s=8, env={"DIST_SHM": "1"})
    assert {f for f in os.listdir("/dev/shm") if f.startswith("dist-")} <= before


def _nccl_like(rank, world, port):
    """A group whose only backend serves CUDA tensors (as an NCCL group): no CPU collective at setup."""
    import datetime

    import torch.distributed as dist

    from dist import comm

    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    try:
        ex = comm.Exchange()
        return sorted(ex._shm_peers)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_exchange_on_a_group_without_cpu_backend_needs_no_cpu_collective():
    from tests.multirank import free_port

    assert run_ranks(_nccl_like, 2, free_port(), timeout_s=40, init_group=False) == [[], []]


_EXIT_IN_FLIGHT = """
import os, secrets, sys, time
import torch
from dist import comm
s = comm._SHM  # a loopback pair in one process: our ring to 'rank 1' is the ring we read from it
path = f"/dev/shm/disttest-{secrets.randbits(40):x}"
w, r = comm._Ring(path, 1 << 20), comm._Ring(path, None)
os.unlink(path)
s.out[1], s.inp[1], s.pids[1] = w, r, os.getpid()
big = torch.ones(64 << 20, dtype=torch.uint8)  # streams through the 1 MiB ring: the helper copies
s.post([comm._Op(big, 1, 7, 0)], [comm._Op(torch.empty_like(big), 1, 7, 0)])
time.sleep(0.1)
"""


def test_exit_with_a_message_in_flight_is_clean():
    """A rank that leaves (an exception, a timeout) while the helper thread copies must exit normally,
    not abort in a torch call the interpreter cut short."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(8):  # without the exit hook 1 run in 6-10 aborted (SIGABRT) here
        proc = subprocess.run([sys.executable, "-c", _EXIT_IN_FLIGHT], capture_output=True, text=True, cwd=root,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_send_is_done_only_once_the_peer_can_see_it():
    import secrets

    from dist import comm

    shm = comm._Shm()
    path = f"/dev/shm/disttest-{secrets.randbits(40):x}"
    writer, reader = comm._Ring(path, 1 << 16), comm._Ring(path, None)
    os.unlink(path)
    shm.out[1], shm.inp[1], shm.pids[1] = writer, reader, os.getpid()
    seen_when_done = []

    class Send(comm._Op):  # records what the reader could see at the moment a send is marked done
        @property
        def done(self):
            return self._done

        @done.setter
        def done(self, value):
            if value:
                seen_when_done.append(int(reader.ctl[0]))
            self._done = value

    ops = [Send(torch.full((n,), float(n)), 1, 3, 0) for n in (10, 1000, 5000)]  # all fit the ring
    for op in ops:
        writer.queue.append(op)
    writer.write()
    assert all(op.done for op in ops)
    assert seen_when_done == [writer.pos] * 3  # published before any was called done
    got = [torch.empty(n) for n in (10, 1000, 5000)]
    with shm.lock:
        for g in got:
            shm._post_recv(comm._Op(g, 1, 3, 0))
        shm.progress()
    assert all(torch.equal(g, torch.full_like(g, float(g.numel()))) for g in got)
