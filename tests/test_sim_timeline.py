"""dist.sim.timeline on hand-sized schedules whose times follow from the rates by hand: messages with
latency and duplex, messages that share a NIC or not, compute beside messages, ranks that run ahead,
kernel calls, a collective that waits for every rank."""

from __future__ import annotations

import pytest

from dist.sim.model import ComputeProfile, LinkProfile, Step
from dist.sim.timeline import replay

MB = 1e6
SECONDS = ComputeProfile("one flop per second", 1.0, 1.0)  # flops = seconds


def step(p, compute=0.0, messages=(), overlapped=True, collective="all_to_all"):
    """A Step of p ranks computing `compute` seconds each (a list: per rank) in one kernel call,
    messages (src, dst, bytes)."""
    s = Step.empty(p)
    s.overlapped, s.collective = overlapped, collective
    for r, c in enumerate(list(compute) if isinstance(compute, (list, tuple)) else [float(compute)] * p):
        s.compute(r, c)
    for src, dst, nbytes in messages:
        s.send(src, dst, nbytes)
    return s


def test_messages_at_the_link_rate_with_latency_and_duplex():
    link = LinkProfile("l", 1 * MB, 0.01, duplex=0.5)
    assert replay([step(2, messages=[(0, 1, 2 * MB)])], link, SECONDS, False) == pytest.approx(2.01)
    # both directions at once: each at half the rate
    both = step(2, messages=[(0, 1, 1 * MB), (1, 0, 1 * MB)])
    assert replay([both], link, SECONDS, False) == pytest.approx(2.01)


@pytest.mark.parametrize("compute, message_s", [(5.0, 2.0), (1.0, 2.0)])
def test_compute_and_messages_overlap_within_a_step(compute, message_s):
    """A device per rank and DMA: a step takes the longer of its compute and its messages."""
    link = LinkProfile("l", 1 * MB, 0.0)
    s = step(2, compute=compute, messages=[(0, 1, message_s * MB)])
    assert replay([s], link, SECONDS, False) == pytest.approx(max(compute, message_s))


@pytest.mark.parametrize("per_peer", [False, True])
def test_one_nic_shares_a_rate_a_mesh_does_not(per_peer):
    link = LinkProfile("l", 1 * MB, 0.0, per_peer=per_peer)
    fan_out = step(3, messages=[(0, 1, 1 * MB), (0, 2, 1 * MB)])
    assert replay([fan_out], link, SECONDS, False) == pytest.approx(1.0 if per_peer else 2.0)


def test_a_rank_with_less_to_do_runs_ahead():
    """Rank 0 computes 3 s in step 0, rank 1 1 s then 1 s in step 1 after a message from rank 2
    (idle in step 0, sending 1 s worth in step 1): no barrier between steps, so rank 1 and 2 finish
    step 1 at 2 s while rank 0 is still in step 0; the pass ends at 3 s (a step-synchronous model
    would give 3 + 1 = 4 s)."""
    link = LinkProfile("l", 1 * MB, 0.0)
    steps = [step(3, compute=[3.0, 1.0, 0.0]), step(3, compute=[0.0, 1.0, 0.0], messages=[(2, 1, 1 * MB)])]
    assert replay(steps, link, SECONDS, False) == pytest.approx(3.0)


def test_kernel_calls_and_backward_rate():
    """Backward steps run at bwd_flops; each kernel call adds call_s."""
    prof = ComputeProfile("k", 2.0, 1.0, call_s=0.25, basis="measured")
    s = step(2, compute=2.0)  # one call of 2 flops per rank
    assert replay([s], LinkProfile("l", 1 * MB, 0.0), prof, False) == pytest.approx(0.25 + 1.0)
    assert replay([s], LinkProfile("l", 1 * MB, 0.0), prof, True) == pytest.approx(0.25 + 2.0)


def test_a_collective_waits_for_every_rank():
    link = LinkProfile("l", 1 * MB, 0.0, alltoall_Bps=0.5 * MB)
    steps = [step(2, compute=[1.0, 3.0]), step(2, overlapped=False)]
    steps[1].sent = [1 * MB, 1 * MB]
    steps[1].messages = [1, 1]
    # the slower rank arrives at 3 s; the all-to-all moves 1 MB at 0.5 MB/s
    assert replay(steps, link, SECONDS, False) == pytest.approx(5.0)
