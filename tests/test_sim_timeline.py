"""dist.sim.timeline on hand-sized schedules whose times follow from the rates by hand: messages that
share a NIC or not, sends released with bytes still buffered, compute and messages slowing each other
(a device per rank, and ranks sharing a machine's cores with its network stack), ranks sharing cores,
a collective that waits for every rank."""

from __future__ import annotations

import pytest

from dist.sim.model import ComputeProfile, LinkProfile, Step, link_profile
from dist.sim.timeline import replay

MB = 1e6
SECONDS = ComputeProfile("one flop per second", 1.0, 1.0)  # flops = seconds


def step(p, compute=0.0, messages=(), overlapped=True, collective="all_to_all"):
    """A Step of p ranks computing `compute` seconds each (a list: per rank), messages (src, dst, bytes)."""
    s = Step([0.0] * p, [0] * p, [0] * p, [0] * p, {}, overlapped, collective)
    s.flops = list(compute) if isinstance(compute, (list, tuple)) else [float(compute)] * p
    for src, dst, nbytes in messages:
        s.pairs[(src, dst)] = nbytes
        s.sent[src] += nbytes
        s.recv[dst] += nbytes
        s.messages[src] += 1
    return s


def test_messages_at_the_link_rate_with_latency_and_duplex():
    link = LinkProfile("l", 1 * MB, 0.01, duplex=0.5)
    assert replay([step(2, messages=[(0, 1, 2 * MB)])], link, SECONDS, False) == pytest.approx(2.01)
    # both directions at once: each at half the rate
    both = step(2, messages=[(0, 1, 1 * MB), (1, 0, 1 * MB)])
    assert replay([both], link, SECONDS, False) == pytest.approx(2.01)
    # compute longer than the messages hides them
    assert replay([step(2, compute=5.0, messages=[(0, 1, 2 * MB)])], link, SECONDS, False) == pytest.approx(5.0)


@pytest.mark.parametrize("per_peer", [False, True])
def test_one_nic_shares_a_rate_a_mesh_does_not(per_peer):
    link = LinkProfile("l", 1 * MB, 0.0, per_peer=per_peer)
    fan_out = step(3, messages=[(0, 1, 1 * MB), (0, 2, 1 * MB)])
    assert replay([fan_out], link, SECONDS, False) == pytest.approx(1.0 if per_peer else 2.0)


@pytest.mark.parametrize("per_peer, expected", [(False, 4.0), (True, 3.0)])
def test_a_released_send_shares_its_nic_with_the_next_step(per_peer, expected):
    """Rank 0 sends 3 MB to rank 1, then 1 MB to rank 2. With 1 MB buffered it is released at 2 s and
    starts the second message while the first one's last MB still drains: through one NIC both go at
    half rate (both end at 4 s), over two cables each at full rate (both end at 3 s)."""
    steps = [step(3, messages=[(0, 1, 3 * MB)]), step(3, messages=[(0, 2, 1 * MB)])]
    buffered = LinkProfile("l", 1 * MB, 0.0, per_peer=per_peer, send_buffer_bytes=1 * MB)
    assert replay(steps, buffered, SECONDS, False) == pytest.approx(expected)
    unbuffered = LinkProfile("l", 1 * MB, 0.0, per_peer=per_peer)  # sends complete on delivery
    assert replay(steps, unbuffered, SECONDS, False) == pytest.approx(4.0)


@pytest.mark.parametrize("receiver_late", [0.0, 0.5])
def test_a_message_the_buffers_hold_releases_its_sender_at_once(receiver_late):
    """Rank 0 sends 1 MB to rank 1 into 2 MB of socket buffers, then 1 MB to rank 2, over two cables
    (1 s each at 1 MB/s): released the moment rank 1 posts its receive, rank 0 starts the second
    message at once, and both end 1 s after that post."""
    link = LinkProfile("l", 1 * MB, 0.0, per_peer=True, send_buffer_bytes=2 * MB)
    steps = [step(3, compute=[0.0, receiver_late, 0.0]),  # rank 1 reaches its receive late, or not
             step(3, messages=[(0, 1, 1 * MB)]), step(3, messages=[(0, 2, 1 * MB)])]
    assert replay(steps, link, SECONDS, False) == pytest.approx(1.0 + receiver_late)


@pytest.mark.parametrize("compute, message_s", [(0.1, 0.3), (0.3, 0.1), (0.1, 0.1)])
def test_compute_and_messages_slow_each_other_until_one_ends(compute, message_s):
    """Each at half speed while both run (rate_while_computing = compute_lost_while_moving = 0.5);
    the one left then runs at full speed: (0.1, 0.3) -> the compute ends at 0.2 s with 0.1 s of
    message done, the other 0.2 s follow: 0.4 s; (0.3, 0.1) likewise; (0.1, 0.1) -> both end at 0.2 s."""
    link = LinkProfile("l", 1 * MB, 0.0, rate_while_computing=0.5, compute_lost_while_moving=0.5)
    s = step(2, compute=compute, messages=[(0, 1, message_s * MB), (1, 0, message_s * MB)])
    expected = 0.2 + abs(compute - message_s)
    assert replay([s], link, SECONDS, False) == pytest.approx(expected)


def test_on_shared_cores_the_network_takes_its_cores_first():
    """2 ranks on 2 cores; the probe saw them lose half their progress while bytes moved (g = 0.5):
    the network takes 1 core. One rank computing beside a message has the other core to itself
    (1 s, the message unslowed); two ranks computing share one core (half speed) and, the cores
    oversubscribed, the message runs at f = 0.5: both take 2 s."""
    shared = ComputeProfile("2 cores", 1.0, 1.0, cores=2)
    link = LinkProfile("l", 1 * MB, 0.0, rate_while_computing=0.5, compute_lost_while_moving=0.5)
    alone = step(2, compute=[1.0, 0.0], messages=[(1, 0, 1 * MB)])
    assert replay([alone], link, shared, False) == pytest.approx(1.0)
    both = step(2, compute=[1.0, 1.0], messages=[(1, 0, 1 * MB)])
    assert replay([both], link, shared, False) == pytest.approx(2.0)
    # a link the probe saw slowed (f = 0.5) but whose bytes took no compute (g = 0): both ranks
    # computing, as in the probe, the message runs at half rate until they stop
    unshared = LinkProfile("l", 1 * MB, 0.0, rate_while_computing=0.5)
    assert replay([both], unshared, shared, False) == pytest.approx(1.5)  # 0.5 MB in 1 s, then 0.5 s


def test_with_a_core_per_rank_the_most_slowed_rank_sets_the_pace():
    """Both ranks of 2 on 2 cores compute 2 s while a 1 MB message takes the first second. The probe
    saw the mean rank lose 0.2 while bytes moved and the most-slowed 0.5: the ranks run at 0.5 for
    that second (0.5 s of work done), then at full speed (1.5 s more): 2.5 s, where the mean alone
    gives 0.8 + 1.2 s. With 4 ranks on the 2 cores (time-shared) the mean holds either way."""
    shared = ComputeProfile("2 cores", 1.0, 1.0, cores=2)
    mean_only = LinkProfile("l", 1 * MB, 0.0, compute_lost_while_moving=0.2)
    uneven = LinkProfile("l", 1 * MB, 0.0, compute_lost_while_moving=0.2, compute_lost_slowest=0.5)
    two = step(2, compute=2.0, messages=[(1, 0, 1 * MB)])
    assert replay([two], mean_only, shared, False) == pytest.approx(2.2)
    assert replay([two], uneven, shared, False) == pytest.approx(2.5)
    # 4 ranks: the network takes 2 - 2 * 0.8 = 0.4 cores for 1 s, the ranks share 1.6 (0.4 each,
    # 0.4 s of work done), then 2 cores (0.5 each, 1.6 s of work in 3.2 s)
    four = step(4, compute=2.0, messages=[(1, 0, 1 * MB)])
    assert replay([four], mean_only, shared, False) == pytest.approx(4.2)
    assert replay([four], uneven, shared, False) == pytest.approx(4.2)
    with pytest.raises(ValueError, match="compute_lost_slowest"):  # below the mean: not a probe's figure
        LinkProfile("l", 1 * MB, 0.0, compute_lost_while_moving=0.2, compute_lost_slowest=0.1)
    read = link_profile({"name": "l", "bandwidth_Bps": 1e6, "latency_s": 0.0, "compute_lost_while_moving": 0.2,
                         "compute_lost_slowest": 0.5})
    assert read == uneven and link_profile({"name": "l", "bandwidth_Bps": 1e6, "latency_s": 0.0}).lost_by_slowest == 0


def test_ranks_share_the_cores_only_while_they_compute_at_once():
    shared = ComputeProfile("2 cores", 1.0, 1.0, cores=2)
    link = LinkProfile("l", 1 * MB, 0.0)
    assert replay([step(4, compute=1.0)], link, shared, False) == pytest.approx(2.0)
    # ranks 0 and 1 compute 1 s while rank 3 waits 1 s for a message, then computes 1 s: never more
    # than 2 ranks at once, so each at full speed (a fixed share of 4 ranks on 2 cores would give 3 s)
    steps = [step(4, compute=[1.0, 1.0, 0.0, 0.0], messages=[(2, 3, 1 * MB)]), step(4, compute=[0.0, 0.0, 0.0, 1.0])]
    assert replay(steps, link, shared, False) == pytest.approx(2.0)


def test_a_collective_waits_for_every_rank():
    link = LinkProfile("l", 1 * MB, 0.0, alltoall_Bps=0.5 * MB)
    steps = [step(2, compute=[1.0, 3.0]), step(2, messages=[], overlapped=False)]
    steps[1].sent = [1 * MB, 1 * MB]
    steps[1].messages = [1, 1]
    # the slower rank arrives at 3 s; the all-to-all moves 1 MB at 0.5 MB/s
    assert replay(steps, link, SECONDS, False) == pytest.approx(5.0)
