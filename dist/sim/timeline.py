"""Replays a schedule on an asynchronous per-rank timeline with messages as fluid flows.

Each rank runs its steps one after another: it posts its step's messages, computes, and goes on to
the next step once its compute is done and every message it sends or receives in that step has
arrived. No barrier between steps: a rank with less to do runs ahead, which a step-synchronous
model (step time = slowest rank) cannot show. Compute and messages overlap fully (a device per
rank; DMA/RDMA moves the bytes).

A message (src -> dst) flows once both ends have posted it (NCCL and gloo send only into a posted
receive) and its latency has passed. Flows share what they cross by max-min fair rates: one NIC
per rank (out and in ports; `LinkProfile.per_peer` False: a switch, NVSwitch, InfiniBand) or one
cable per pair (per_peer: a mesh), each direction at `bandwidth_Bps`, at `duplex` of it while the
opposite direction carries data too.

A step that is a blocking collective (all-gather, all-to-all; no compute of its own) waits for every
rank, then takes the collective's time at the link's collective rate; every rank leaves it at the
same moment.
"""

from __future__ import annotations

_EPS = 1e-12


class _Flow:
    __slots__ = ("src", "dst", "left", "start", "done")

    def __init__(self, src: int, dst: int, nbytes: float, start: float):
        self.src, self.dst, self.left, self.start, self.done = src, dst, float(nbytes), start, False


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
    step = [0] * p                 # each rank's current step
    posted = [None] * p            # when it posted that step (None: not yet)
    work = [0.0] * p               # its compute left, seconds
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
            if r in (a, b):
                fl = flows.get((a, b, t))
                if fl is None or not fl.done:
                    return
        advance_rank(r, now)

    def post(r: int, t: float) -> None:
        s = steps[step[r]]
        if not s.overlapped:  # a blocking collective: everyone meets, then it runs
            here = arrived.setdefault(step[r], {})
            here[r] = t
            if len(here) == p:
                assert not any(s.flops), "a collective step computes nothing; its compute is its own step"
                if s.collective == "all_gather":
                    coll = max(link.allgather_s(s.recv[q], s.messages[q], p) for q in range(p))
                else:
                    coll = max(link.alltoall_s(s.sent[q], s.messages[q]) for q in range(p))
                end = max(here.values()) + coll
                for q in range(p):
                    advance_rank(q, end)
            return
        posted[r] = t
        work[r] = compute.step_seconds(s, r, backward)
        for (a, b), nbytes in s.pairs.items():
            other = b if r == a else a if r == b else None
            if other is not None and posted[other] is not None and step[other] == step[r]:
                start = max(posted[a], posted[b]) + s.messages[a] * link.latency_s
                flows[(a, b, step[r])] = _Flow(a, b, nbytes, start)
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
        ends = [now + work[r] if computing[r] else None for r in range(p)]
        arrivals = [now + fl.left / v if v > 0 else None for fl, v in zip(live, speeds)]
        events = [t for t, _ in due] + [fl.start for fl in flows.values() if not fl.done and fl.start > now + _EPS]
        events += [t for t in ends + arrivals if t is not None]
        if not events:
            raise RuntimeError("dist.sim timeline: ranks wait on each other (schedule without a match)")
        nxt = max(min(events), now)
        near = _EPS * max(1.0, nxt)  # what lands on nxt lands there, whatever the rounding
        for fl, v, arrive in zip(live, speeds, arrivals):
            fl.left -= v * (nxt - now)
            if arrive is not None and arrive <= nxt + near:
                fl.left, fl.done = 0.0, True
        for r in range(p):
            if computing[r]:
                work[r] = 0.0 if ends[r] <= nxt + near else work[r] - (nxt - now)
        now = nxt
        for fl in live:
            if fl.done:
                try_finish(fl.src)
                try_finish(fl.dst)
        for r in range(p):
            if computing[r] and work[r] == 0.0:
                try_finish(r)
    return max(finished)
