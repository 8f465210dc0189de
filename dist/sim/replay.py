"""Analytic per-step replay: the timeline's answer in O(P) per step, for scaling studies to 1024 ranks.

dist.sim.timeline replays a schedule as fluid flows at max-min fair rates; for TokenRing that costs
O(P^3) (P steps, O(P) flows re-rated at every event), too slow past a few dozen ranks, and building
the schedule itself (model.schedule) costs O(P^3) through relay_start. This module keeps the same
semantics per step and rank, vectorised over ranks with numpy:

- Counts: each strategy's per-step flops, kernel calls and messages (src -> dst, bytes) from the same
  plan (dist.plan: block, q_needed, relay_start, diag_parts) as model.schedule. A block's size and
  q_needed depend only on the order of owner and holder (a < b, a > b, a == b), so each is computed
  once per order and relay_start in O(1) (`fast_relay_start`); the tests check both against the plan.
- Time per rank per step: a rank posts step t when it finishes step t-1; a message starts once both
  ends have posted it and its latency has passed; it shares its sender's out port and its receiver's
  in port with that step's other messages (processor sharing on each port, at `duplex` of the rate
  when the rank also receives; per_peer links: a cable per pair) and ends when the slower of its two
  ports has carried it; the rank finishes the step when its compute and every message it sends or
  receives are done. Blocking collectives wait for every rank, as in the timeline.

What it leaves out of the timeline: rates are fixed per step from which messages share a port (the
timeline re-rates continuously as messages start and end), and a message's rate is the slower port's
share rather than the max-min fair rate over both. Where every port carries one message per step (the
KV ring, the collectives) the two agree exactly; where TokenRing's Q and results share a port they
agree within the tolerance the tests state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dist.plan import diag_parts, q_needed

from .model import BWD_FLOPS, FREE_LINK, ComputeProfile, LinkProfile, Prediction, Step, Workload


@dataclass
class Phase:
    """One step of a schedule for all P ranks at once (the vector form of model.Step).

    flops, kernels: [P] per rank; src, dst, nbytes: [F] the step's messages (one per (src, dst) pair);
    messages: [P] messages each rank sends (latencies); overlapped False: a blocking collective whose
    per-rank bytes are in sent/recv ([P]); calls: [(call, counts [P])], the kernel calls by shape
    (call = (flops, rows, cols, causal) as model.Step.calls, for the compute profile's tiles);
    moved: [P] element-wise bytes (model.Step.moved)."""

    flops: np.ndarray
    kernels: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    messages: np.ndarray
    overlapped: bool = True
    collective: str = "all_to_all"
    sent: np.ndarray | None = None
    recv: np.ndarray | None = None
    calls: list = field(default_factory=list)
    moved: np.ndarray | None = None

    def compute_s(self, compute: ComputeProfile, backward: bool) -> np.ndarray:
        """[P] each rank's compute in this step: ComputeProfile.step_seconds, for all ranks at once."""
        flops = self.flops.copy()
        for call, counts in self.calls:  # whole tiles where the profile has them
            flops += counts * (compute.kernel_flops(*call) - call[0])
        out = self.kernels * compute.call_s + flops / (compute.bwd_flops if backward else compute.fwd_flops)
        if compute.mem_Bps and self.moved is not None:
            out = out + self.moved / compute.mem_Bps
        return out


def from_steps(steps: list[Step]) -> list[Phase]:
    """model.schedule's Steps as Phases (to replay a schedule both ways)."""
    out = []
    for s in steps:
        pairs = sorted(s.pairs.items())
        p = len(s.flops)
        shapes = sorted({call for calls in s.calls for call in calls})
        calls = [(c, np.array([rank_calls.count(c) for rank_calls in s.calls], float)) for c in shapes]
        out.append(Phase(np.array(s.flops, float), np.array(s.kernels, float),
                         np.array([a for (a, _), _ in pairs], int), np.array([b for (_, b), _ in pairs], int),
                         np.array([n for _, n in pairs], float), np.array(s.messages, float), s.overlapped,
                         s.collective, np.array(s.sent, float), np.array(s.recv, float), calls,
                         np.array(s.moved if s.moved else [0] * p, float)))
    return out


# ------------------------------------------------------------------------------------------------ counts


def _order_values(w: Workload) -> dict:
    """Block flops and q_needed per order of owner a and holder b (block() depends on nothing else)."""
    n, lay, c = w.local_seq, w.layout, w.causal
    probe = Workload(w.batch, n, w.heads_q, w.heads_kv, w.head_dim, max(2, w.world), c, lay, w.itemsize)
    return {"flops_lt": probe.block_flops(1, 0), "flops_gt": probe.block_flops(0, 1),
            "flops_diag": probe.block_flops(0, 0),
            "call_lt": probe.block_call(1, 0), "call_gt": probe.block_call(0, 1), "call_diag": probe.block_call(0, 0),
            "qn_lt": q_needed(1, 0, n, lay, c), "qn_gt": q_needed(0, 1, n, lay, c)}


def _scaled(call: tuple, factor: float) -> tuple:
    return (factor * call[0], *call[1:])


def _calls_by_order(a, b, o: dict, factor: float) -> list:
    """Kernel calls of blocks (queries of a, keys of b) for arrays a, b: one class per order."""
    out = []
    for mask, call in ((a > b, o["call_lt"]), (a < b, o["call_gt"]), (a == b, o["call_diag"])):
        if call[0] and mask.any():
            out.append((_scaled(call, factor), mask.astype(float)))
    return out


def _call_values(a, b, o: dict, index: int):
    """Per element of a, b: entry `index` of its block's call (1: rows, 2: cols), 0 for an empty block."""
    pick = [(o[k][index] if o[k][0] else 0) for k in ("call_lt", "call_gt", "call_diag")]
    return _by_order(a, b, *pick)


def fast_relay_start(a, holder, world: int, w: Workload, order: dict | None = None):
    """dist.plan.relay_start(a, holder, ...) for arrays of a and holder in O(1) each: the visitors of Q_a
    after `holder` are a+1 .. a+m (mod P), m = (holder - a - 1) mod P; some is above a iff m >= 1 and
    a < P-1, some below iff the range wraps (a + m >= P)."""
    order = order or _order_values(w)
    a, holder = np.asarray(a), np.asarray(holder)
    m = (holder - a - 1) % world
    start = np.full(np.broadcast(a, holder).shape, w.local_seq)
    start = np.where((m >= 1) & (a < world - 1), np.minimum(start, order["qn_gt"]), start)
    return np.where(a + m >= world, np.minimum(start, order["qn_lt"]), start)


def _by_order(a, b, lt, gt, diag):
    return np.where(a == b, diag, np.where(a > b, lt, gt))


def _phase(p, flops, kernels, flows, calls=(), moved=0.0) -> Phase:
    """flows: (src [P], dst [P], bytes [P]) groups; zero-byte messages are dropped and a rank's messages
    to one peer in a step merge into one (as model.Step.send does). calls, moved: see Phase."""
    src = np.concatenate([f[0] for f in flows]) if flows else np.zeros(0, int)
    dst = np.concatenate([f[1] for f in flows]) if flows else np.zeros(0, int)
    nb = np.concatenate([np.broadcast_to(f[2], f[0].shape).astype(float) for f in flows]) if flows else np.zeros(0)
    keep = nb > 0
    src, dst, nb = src[keep], dst[keep], nb[keep]
    messages = np.bincount(src, minlength=p).astype(float)
    if len(src):
        key = src * p + dst
        uniq, inv = np.unique(key, return_inverse=True)
        if len(uniq) < len(key):
            nb = np.bincount(inv, weights=nb)
            src, dst = uniq // p, uniq % p
    return Phase(flops.astype(float), kernels.astype(float), src, dst, nb, messages, calls=list(calls),
                 moved=np.broadcast_to(np.asarray(moved, float), (p,)).copy())


def _compute_only(p, flops, kernels, calls=(), moved=0.0) -> Phase:
    return _phase(p, np.asarray(flops, float), np.asarray(kernels, float), [], calls, moved)


def _collective(p: int, nbytes: float, kind: str) -> Phase:
    z = np.zeros(p)
    return Phase(z, z, np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.full(p, p - 1.0 if kind == "all_gather"
                 else 1.0), False, kind, np.full(p, float(int(nbytes))), np.full(p, float(int(nbytes))),
                 moved=np.zeros(p))


def _tokenring(w: Workload, backward: bool) -> list[Phase]:
    p, n, hq, hkv = w.world, w.local_seq, w.heads_q, w.heads_kv
    o = _order_values(w)
    travel = 2 * (w.q_row() + w.lse_row()) if backward else w.q_row()
    back = w.q_row() if backward else w.q_row() + w.lse_row()
    factor = BWD_FLOPS if backward else 1.0
    parts = diag_parts(n, w.causal, w.diag_tail if p > 1 else 0.0)
    r = np.arange(p)
    out = []
    for t in range(p + 1 if p > 1 else 1):
        a = (r + t) % p
        calls, moved = [], np.zeros(p)
        if t == 0:
            call = w.part_call(*parts[0], w.causal)
            f = np.full(p, factor * call[0])
            calls = [(_scaled(call, factor), np.ones(p))] if call[0] else []
            if backward:
                moved += w.sum_bytes(n, hq) + 2 * w.sum_bytes(parts[0][2], hkv)
        elif t < p:
            f = factor * _by_order(a, r, o["flops_lt"], o["flops_gt"], o["flops_diag"])
            calls = _calls_by_order(a, r, o, factor)
            if backward:
                moved += 2 * w.sum_bytes(_call_values(a, r, o, 2), hkv)
        else:
            call = w.part_call(*parts[1], w.causal) if len(parts) > 1 else (0.0, 0, 0, False)
            f = np.full(p, factor * call[0])
            calls = [(_scaled(call, factor), np.ones(p))] if call[0] else []
            if len(parts) > 1:
                moved += (w.sum_bytes(call[1], hq) + 2 * w.sum_bytes(call[2], hkv)) if backward \
                    else w.merge_bytes(call[1])
        flows = []
        if t < p - 1:
            flows.append((r, (r - 1) % p, (n - fast_relay_start(a, r, p, w, o)) * travel))
        if t >= 2:
            owner = (r + t - 1) % p
            flows.append((r, owner, (n - _by_order(owner, r, o["qn_lt"], o["qn_gt"], 0)) * back))
            rows = n - _by_order(r, (r - t + 1) % p, o["qn_lt"], o["qn_gt"], 0)  # ours, folded in
            moved += w.sum_bytes(rows, hq) if backward else w.merge_bytes(rows)
        out.append(_phase(p, f, (f > 0).astype(float), flows, calls, moved))
    return out


def _ring(w: Workload, backward: bool) -> list[Phase]:
    p, n = w.world, w.local_seq
    o = _order_values(w)
    factor = BWD_FLOPS if backward else 1.0
    dkv = n * w.kv_row() // w.itemsize * w.acc_itemsize
    r = np.arange(p)
    out = []
    for t in range(p):
        b = (r - t) % p
        f = factor * _by_order(r, b, o["flops_lt"], o["flops_gt"], o["flops_diag"])
        rows = _call_values(r, b, o, 1)
        if backward:
            moved = (w.sum_bytes(rows, w.heads_q) + 2 * w.sum_bytes(n, w.heads_kv)) * (t > 0)
        else:
            moved = w.merge_bytes(rows) * (t > 0)
        flows = []
        if t < p - 1:
            flows.append((r, (r + 1) % p, n * w.kv_row()))
        if backward and t >= 1:
            flows.append((r, (r + 1) % p, dkv))
        out.append(_phase(p, f, (f > 0).astype(float), flows, _calls_by_order(r, b, o, factor), moved))
    if backward and p > 1:
        out.append(_phase(p, np.zeros(p), np.zeros(p), [(r, (r + 1) % p, dkv)]))
    return out


def _allgather(w: Workload, backward: bool) -> list[Phase]:
    p, n = w.world, w.local_seq
    o = _order_values(w)
    factor = BWD_FLOPS if backward else 1.0
    r = np.arange(p, dtype=float)
    below, above = r, p - 1 - r  # holders b < r (rank r is then the later owner) and b > r
    f = factor * (o["flops_diag"] + below * o["flops_lt"] + above * o["flops_gt"])
    k = (o["flops_diag"] > 0) + below * (o["flops_lt"] > 0) + above * (o["flops_gt"] > 0)
    counts = {"call_lt": below, "call_gt": above, "call_diag": np.ones(p)}
    calls = [(_scaled(o[c], factor), n_c) for c, n_c in counts.items() if o[c][0] and n_c.any()]
    # element-wise: every visible block's dQ and dK/dV sums (forward: merges), less the first block's
    # dQ sum (merge): the first block a rank sees (holder 0 upward) is taken over
    hq, hkv = w.heads_q, w.heads_kv
    per = {c: (w.sum_bytes(o[c][1], hq), 2 * w.sum_bytes(o[c][2], hkv)) if backward else (w.merge_bytes(o[c][1]), 0)
           for c in counts}
    moved = sum(counts[c] * (per[c][0] + per[c][1]) for c in counts if o[c][0])
    first_lt = (below > 0) & bool(o["call_lt"][0])
    first_diag = ~first_lt & bool(o["call_diag"][0])
    first_gt = ~first_lt & ~first_diag & (above > 0) & bool(o["call_gt"][0])
    moved = moved - first_lt * per["call_lt"][0] - first_diag * per["call_diag"][0] - first_gt * per["call_gt"][0]
    if backward:
        moved = moved + 2 * (2 * w.sum_bytes(p * n, hkv) // 3)
    comp = _compute_only(p, f, k, calls, moved)
    if p == 1:
        return [comp]
    if not backward:
        return [_collective(p, (p - 1) * n * w.kv_row(), "all_gather"), comp]
    dkv = (p - 1) * n * w.kv_row() // w.itemsize * w.acc_itemsize
    return [comp, _collective(p, dkv, "all_to_all")]


def _ulysses(w: Workload, backward: bool) -> list[Phase]:
    p, n = w.world, w.local_seq
    o = _order_values(w)
    share = (p - 1) / p
    qkv, q = n * (w.q_row() + w.kv_row()) * share, n * w.q_row() * share
    pairs_lt = p * (p - 1) / 2  # ordered (a, b) pairs with a > b; as many with a < b
    full = (p * o["flops_diag"] + pairs_lt * (o["flops_lt"] + o["flops_gt"])) / p
    factor = BWD_FLOPS if backward else 1.0
    copies = 3 * (2 * w.copy_bytes(n, w.heads_q) + 2 * w.copy_bytes(n, w.heads_kv)) if p > 1 else 0
    comp = _compute_only(p, np.full(p, factor * full), np.ones(p),
                         [((factor * full, p * n, p * n, w.causal), np.ones(p))], copies)
    if p == 1:
        return [comp]
    first, last = (q, qkv) if backward else (qkv, q)
    return [_collective(p, first, "all_to_all"), comp, _collective(p, last, "all_to_all")]


_PHASES = {"tokenring": _tokenring, "ring": _ring, "allgather": _allgather, "ulysses": _ulysses}


def phases(strategy: str, w: Workload, backward: bool = False) -> list[Phase]:
    """The strategy's schedule as Phases, built in O(P) per step (model.schedule's counts)."""
    if strategy not in _PHASES:
        raise ValueError(f"strategy must be one of {tuple(_PHASES)}, got {strategy!r}")
    return _PHASES[strategy](w, backward)


# ------------------------------------------------------------------------------------------------ time


def _shared_port_ends(port: np.ndarray, start: np.ndarray, nbytes: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """End times of messages that share ports by processor sharing, each port at its own rate cap
    (bytes/s). Messages of a port are served alone until the next one starts, then in equal shares."""
    end = start + nbytes / cap
    if not len(port):
        return end
    order = np.lexsort((start, port))
    counts = np.bincount(port)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    two = np.flatnonzero(counts == 2)  # TokenRing's Q and results: in closed form, all ports at once
    if len(two):
        i, j = order[first[two]], order[first[two] + 1]  # i starts first
        c = cap[i]
        head = nbytes[i] - c * (start[j] - start[i])     # what i has left when j starts
        alone = head <= 0
        small = np.minimum(head, nbytes[j])
        shared_small, shared_big = start[j] + 2 * small / c, start[j] + (head + nbytes[j]) / c
        end[i] = np.where(alone, end[i], np.where(head <= nbytes[j], shared_small, shared_big))
        end[j] = np.where(alone, end[j], np.where(head <= nbytes[j], shared_big, shared_small))
    for q in np.flatnonzero(counts > 2):
        idx = order[first[q]:first[q] + counts[q]]
        end[idx] = _processor_sharing(start[idx], nbytes[idx], cap[idx[0]])
    return end


def _processor_sharing(start, nbytes, cap) -> np.ndarray:
    """Exact end times of jobs (sorted by start) on one server of rate `cap` shared equally."""
    left = nbytes.astype(float).copy()
    end = np.full(len(left), np.inf)
    now, active, nxt = start[0], [], 0
    while nxt < len(left) or active:
        while nxt < len(left) and start[nxt] <= now + 1e-15:
            active.append(nxt)
            nxt += 1
        if not active:
            now = start[nxt]
            continue
        rate = cap / len(active)
        first = min(left[i] for i in active) / rate
        until = start[nxt] - now if nxt < len(left) else np.inf
        dt = min(first, until)
        for i in active:
            left[i] -= rate * dt
        now += dt
        for i in [i for i in active if left[i] <= 1e-9 * max(1.0, nbytes[i])]:
            end[i] = now
            active.remove(i)
    return end


def _flow_ends(ph: Phase, post: np.ndarray, link: LinkProfile) -> np.ndarray:
    """When each of the phase's messages has arrived, given when each rank posted the step."""
    p = len(post)
    start = np.maximum(post[ph.src], post[ph.dst]) + ph.messages[ph.src] * link.latency_s
    bw, duplex = link.bandwidth_Bps, link.duplex
    if link.per_peer:  # a cable per pair and direction: alone on it, at duplex when the reverse one carries data
        pairs = set(zip(ph.src.tolist(), ph.dst.tolist()))
        rev = np.array([(b, a) in pairs for a, b in zip(ph.src.tolist(), ph.dst.tolist())], bool)
        return start + ph.nbytes / (bw * np.where(rev, duplex, 1.0))
    sends = np.bincount(ph.src, minlength=p) > 0
    recvs = np.bincount(ph.dst, minlength=p) > 0
    out_cap = bw * np.where(recvs[ph.src], duplex, 1.0)  # the sender's out port, at duplex while it receives
    in_cap = bw * np.where(sends[ph.dst], duplex, 1.0)
    return np.maximum(_shared_port_ends(ph.src, start, ph.nbytes, out_cap),
                      _shared_port_ends(ph.dst, start, ph.nbytes, in_cap))


def replay_phases(phs: list[Phase], link: LinkProfile, compute: ComputeProfile, backward: bool,
                  per_step: bool = False):
    """Time until every rank has finished the phases (per_step: also the slowest rank's time in each
    step, [steps])."""
    p = len(phs[0].flops)
    done = np.zeros(p)
    steps = []
    for ph in phs:
        before = done.max()
        if not ph.overlapped:
            if ph.collective == "all_gather":
                coll = max(link.allgather_s(r, m, p) for r, m in set(zip(ph.recv.tolist(), ph.messages.tolist())))
            else:
                coll = max(link.alltoall_s(s, m) for s, m in set(zip(ph.sent.tolist(), ph.messages.tolist())))
            done = np.full(p, before + coll)
        else:
            end = done + ph.compute_s(compute, backward)
            if len(ph.src):
                arrive = _flow_ends(ph, done, link)
                np.maximum.at(end, ph.src, arrive)
                np.maximum.at(end, ph.dst, arrive)
            done = end
        steps.append(done.max() - before)
    return (done.max(), steps) if per_step else done.max()


def pass_time(strategy: str, w: Workload, link: LinkProfile, compute: ComputeProfile, backward: bool) -> float:
    """Modelled time of one forward (or backward) pass on every rank."""
    return replay_phases(phases(strategy, w, backward), link, compute, backward)


def max_sent(strategy: str, w: Workload) -> float:
    """Bytes the busiest rank sends, forward + backward (model.bytes_per_rank's max)."""
    total = np.zeros(w.world)
    for bw in (False, True):
        for ph in phases(strategy, w, bw):
            if ph.overlapped:
                total += np.bincount(ph.src, weights=ph.nbytes, minlength=w.world)
            else:
                total += ph.sent
    return float(total.max())


def predict_fast(strategy: str, w: Workload, link: LinkProfile, compute: ComputeProfile) -> Prediction:
    """model.predict by the analytic replay (same Prediction fields)."""
    return Prediction(strategy, pass_time(strategy, w, link, compute, False), pass_time(strategy, w, link, compute, True),
                      pass_time(strategy, w, FREE_LINK, compute, False) + pass_time(strategy, w, FREE_LINK, compute, True),
                      int(max_sent(strategy, w)))
