"""Replays a schedule on an asynchronous per-rank timeline with messages as fluid flows.

Each rank runs its steps one after another: it posts its step's messages, computes, and goes on to
the next step once its compute is done, every message it receives has arrived and every message it
sends has been released. No barrier between steps: a rank with less to do runs ahead, which a
step-synchronous model (step time = slowest rank) cannot show.

A message (src -> dst) flows once both ends have posted it (gloo and NCCL send only into a posted
receive). Flows share what they cross by max-min fair rates: one NIC per rank (out and in ports,
`LinkProfile.per_peer` False: a switch) or one cable per pair (per_peer: a mesh), each direction at
`bandwidth_Bps`, at `duplex` of it while the opposite direction carries data too. A sender is
released when no more than `send_buffer_bytes` remain (socket buffers hold the rest; 0 for DMA/RDMA
links), so its next step's messages may share its NIC with that tail: on a switch the tail then
slows, on a mesh it does not (benchmarks/results/bench_testbed_messages.md: TokenRing's messages
alone, kernels stubbed, P=3 at 200 Mbit/s, took 1.01 s on a switch and 0.83 s on a mesh; this
replay gives 0.95 and 0.82 s, a model that ends every step together on every rank 0.90 and 0.88 s).

Compute: rank r's step takes flops / rate alone. When the ranks share one machine's
`ComputeProfile.cores` CPU cores (the testbed, loopback), the ranks computing at one moment share
them, and while any message moves the network stack takes its cores first (kernel softirq work
runs ahead of the ranks): benchmarks/bench_links.py's interference probe saw its p ranks, all
computing, lose compute_lost_while_moving (g) of their progress while bytes moved, so the network
takes cores - min(p, cores) * (1 - g) and the n ranks computing run at min(1, what is left / n).
Messages whose ends compute run at rate_while_computing (the probe's f) while the cores are as
busy as in the probe (n >= min(p, cores)) or oversubscribed (n + the network's share > cores).
TokenRing's ranks mostly wait on messages, so one computing rank rarely finds the cores short;
charging g to every rank with a message in flight, as a device-per-rank view would, over-predicted
TokenRing on the 200 Mbit/s mesh by 10-13% when this rule was made and left the other testbed points where
they were. With a core per rank (p <= cores) the network's work does not spread evenly: in each
step one rank's core does more of it, and ranks that wait on each other wait for that one, so
while all p compute beside moving bytes they run at 1 - compute_lost_slowest (the probe's
most-slowed rank; bench_links.md at 1 Gbit/s, P=2: 0.28 against the mean 0.20); with more ranks
than cores the scheduler moves them between cores and the mean holds.

With a device per rank (cores = None; GPU links have f = 1 and g = 0) a rank's compute runs at
1 - g while its own messages move and its messages at f while either end computes.

A step that is a blocking collective (all-gather, all-to-all; no compute of its own) waits for every
rank, then takes the collective's time at the link's measured collective rate; every rank leaves it
at the same moment.
"""

from __future__ import annotations

_EPS = 1e-12


class _Flow:
    __slots__ = ("src", "dst", "left", "start", "released", "done")

    def __init__(self, src: int, dst: int, nbytes: float, start: float, buffered: float):
        self.src, self.dst, self.left, self.start = src, dst, float(nbytes), start
        self.released, self.done = nbytes <= buffered, False


def _fair_rates(flows: list, link) -> list[float]:
    """Max-min fair rates (bytes/s) of the active flows over the ports or cables they cross."""
    bw, duplex = link.bandwidth_Bps, link.duplex
    if link.per_peer:
        pairs = {(f.src, f.dst) for f in flows}
        crossed = [[("cable", f.src, f.dst)] for f in flows]

        def capacity(res):
            return bw * (duplex if (res[2], res[1]) in pairs else 1.0)
    else:
        sending, receiving = {f.src for f in flows}, {f.dst for f in flows}
        crossed = [[("out", f.src), ("in", f.dst)] for f in flows]

        def capacity(res):
            both = res[1] in (receiving if res[0] == "out" else sending)
            return bw * (duplex if both else 1.0)

    left = {res: capacity(res) for path in crossed for res in path}
    rates = [0.0] * len(flows)
    open_ = set(range(len(flows)))
    while open_:
        users: dict = {}
        for i in open_:
            for res in crossed[i]:
                users[res] = users.get(res, 0) + 1
        tight = min(users, key=lambda res: left[res] / users[res])
        share = left[tight] / users[tight]
        for i in open_:
            rates[i] += share
            for res in crossed[i]:
                left[res] -= share
        open_ = {i for i in open_ if tight not in crossed[i] and all(left[res] > _EPS * bw for res in crossed[i])}
    return rates


def replay(steps: list, link, compute, backward: bool) -> float:
    """Time until every rank has finished `steps` (dist.sim.model.Step, one schedule pass)."""
    p = len(steps[0].flops)
    rate = compute.bwd_flops if backward else compute.fwd_flops
    cores = compute.cores
    f_rate, g_lost, g_slowest = link.rate_while_computing, link.compute_lost_while_moving, link.lost_by_slowest
    # the probe saw its p ranks computing on `cores` lose g of their progress while bytes moved: the
    # network stack (softirq, which runs ahead of the ranks) took what the ranks lost
    network_cores = cores - min(p, cores) * (1.0 - g_lost) if cores else 0.0
    buffered = link.send_buffer_bytes
    step = [0] * p                 # each rank's current step
    posted = [None] * p            # when it posted that step (None: not yet)
    work = [0.0] * p               # its compute left, in seconds at full speed
    finished = [None] * p
    due = [(0.0, r) for r in range(p)]  # (time, rank): posts to make
    flows: dict = {}               # (src, dst, step) -> _Flow
    arrived: dict = {}             # collective step -> {rank: time}
    now = 0.0

    def advance_rank(r: int, t: float) -> None:
        step[r] += 1
        posted[r] = None
        if step[r] < len(steps):
            due.append((t, r))
        else:
            finished[r] = t

    def try_finish(r: int) -> None:
        t = step[r]
        if t >= len(steps) or posted[r] is None or work[r] > _EPS:
            return
        for (a, b) in steps[t].pairs:
            if r not in (a, b):
                continue
            fl = flows.get((a, b, t))
            if fl is None or (r == b and not fl.done) or (r == a and not fl.released):
                return
        advance_rank(r, now)

    def post(r: int, t: float) -> None:
        s = steps[step[r]]
        if not s.overlapped:  # a blocking collective: everyone meets, then it runs
            here = arrived.setdefault(step[r], {})
            here[r] = t
            if len(here) == p:
                if s.collective == "all_gather":
                    coll = max(link.allgather_s(s.recv[q], s.messages[q], p) for q in range(p))
                else:
                    coll = max(link.alltoall_s(s.sent[q], s.messages[q], s.calls) for q in range(p))
                assert not any(s.flops), "a collective step computes nothing; its compute is its own step"
                end = max(here.values()) + coll
                for q in range(p):
                    advance_rank(q, end)
            return
        posted[r] = t
        work[r] = s.flops[r] / rate
        for (a, b), nbytes in s.pairs.items():
            other = b if r == a else a if r == b else None
            if other is not None and posted[other] is not None and step[other] == step[r]:
                start = max(posted[a], posted[b]) + s.messages[a] * link.latency_s
                flows[(a, b, step[r])] = _Flow(a, b, nbytes, start, buffered)
                if other == a:  # a sender already waiting: a message its buffers hold releases it now
                    try_finish(a)
        try_finish(r)

    while None in finished:
        due.sort()
        while due and due[0][0] <= now + _EPS:
            t, r = due.pop(0)
            post(r, max(t, now))
        if None not in finished:
            break
        live = [fl for fl in flows.values() if not fl.done and fl.start <= now + _EPS]
        speeds = _fair_rates(live, link) if live else []
        computing = [posted[r] is not None and work[r] > _EPS for r in range(p)]
        moving = [False] * p
        for fl in live:
            moving[fl.src] = moving[fl.dst] = True
        n_computing = sum(computing)
        if cores:  # one machine's cores: the moving bytes' share first, the computing ranks the rest
            net = network_cores if live else 0.0
            pace = [min(1.0, (cores - net) / n_computing) if n_computing else 1.0] * p
            if live and p <= cores and n_computing == p:  # a core per rank, as the probe's: uneven
                pace = [min(pace[0], 1.0 - g_slowest)] * p
            # as loaded as the probe was (its ranks all computing), or the cores oversubscribed
            slowed = n_computing >= min(p, cores) or n_computing + net > cores
            for i, fl in enumerate(live):
                if slowed and (computing[fl.src] or computing[fl.dst]):
                    speeds[i] *= f_rate
        else:  # a device per rank: only a rank's own messages and compute meet
            pace = [(1.0 - g_lost) if moving[r] else 1.0 for r in range(p)]
            for i, fl in enumerate(live):
                if computing[fl.src] or computing[fl.dst]:
                    speeds[i] *= f_rate
        ends = [now + work[r] / pace[r] if computing[r] else None for r in range(p)]
        arrivals = [now + fl.left / v if v > 0 else None for fl, v in zip(live, speeds)]
        releases = [now + (fl.left - buffered) / v if v > 0 and not fl.released else None
                    for fl, v in zip(live, speeds)]
        events = [t for t, _ in due] + [fl.start for fl in flows.values() if not fl.done and fl.start > now + _EPS]
        events += [t for t in ends + arrivals + releases if t is not None]
        if not events:
            raise RuntimeError("dist.sim timeline: ranks wait on each other (schedule without a match)")
        nxt = max(min(events), now)
        near = _EPS * max(1.0, nxt)  # what lands on nxt lands there, whatever the rounding
        for fl, v, arrive, release in zip(live, speeds, arrivals, releases):
            fl.left -= v * (nxt - now)
            if arrive is not None and arrive <= nxt + near:
                fl.left, fl.done, fl.released = 0.0, True, True
            elif release is not None and release <= nxt + near:
                fl.released = True
        for r in range(p):
            if computing[r]:
                work[r] = 0.0 if ends[r] <= nxt + near else work[r] - pace[r] * (nxt - now)
        now = nxt
        for fl in live:
            if fl.released:
                try_finish(fl.src)
            if fl.done:
                try_finish(fl.dst)
        for r in range(p):
            if computing[r] and work[r] == 0.0:
                try_finish(r)
    return max(finished)
