"""Heterogeneity-adaptive scattering: which sequences run on which sequence-parallel group, per step.

    plan = plan_scatter(seq_lens, world_size=64, max_tokens_per_rank=32768)
    for microbatch in plan.microbatches:          # run one after another
        for group in microbatch:                  # disjoint groups, run at the same time
            group.ranks, group.seq_ids            # (8, 9, 10, 11), [3, 17]: packed into one pass

Real batches mix a few long sequences with many short ones. A static SP degree sized for the longest
makes every short sequence pay ring communication it does not need; here each sequence gets a group
of its own size: short ones on one rank (no messages), long ones on as many ranks as their memory
and time need (FlexSP, PAPERS.md).

Groups are aligned powers of two (ranks [k*d, (k+1)*d)), so they nest: a rank belongs to at most
log2(N) + 1 of them and a runtime builds them once (`candidate_groups`). Any set of such sizes that
sums to at most N tiles the ranks disjointly (largest first, each at the next aligned offset).

Per micro-batch, a mixed-integer program (PuLP) picks group slots and how many sequences of each
length bucket each slot runs, minimising the slowest group's time, with every sequence placed once
and no rank over max_tokens_per_rank. A greedy plan (the best homogeneous degree, longest-first
placement) comes first: it is the solver's warm start and the fallback when the solver is missing,
runs out of time without a solution or finds none; the better of the two is kept.
"""

from __future__ import annotations

import heapq
import math
import time
import warnings
from dataclasses import dataclass, field

from .cost import CostModel

MAX_BUCKETS = 12        # lengths per micro-batch program; beyond that, buckets of equal token mass
SOLVERS = ("cbc", "highs")
SLOT_VARS = 100         # the exact slot program up to this many assignment variables, else the pooled one
SOLVER_OVERHEAD_S = 0.25  # what a solver call and its rounding cost beyond the solver's limit (busy hosts: more)
MIN_SOLVE_S = 0.02        # a solver call gets at least this long, or none


@dataclass
class Group:
    """ranks: an aligned power-of-two block of ranks; seq_ids: the batch's sequences it runs, packed."""

    ranks: tuple[int, ...]
    seq_ids: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """microbatches run one after another; each is a list of disjoint groups that run at once.
    predicted_step_s: sum over micro-batches of the slowest group's time (the cost model's);
    solver: "lp" where the program's solution was kept, "greedy" where the fallback was;
    solve_s: seconds spent planning."""

    microbatches: list[list[Group]]
    predicted_step_s: float
    solver: str
    solve_s: float


# ---------------------------------------------------------------- candidate groups

def degrees(world_size: int) -> list[int]:
    """Group sizes: powers of two up to the world size."""
    check_world(world_size)
    return [1 << i for i in range(world_size.bit_length())]


def check_world(world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1 or world_size & (world_size - 1):
        raise ValueError(f"world_size {world_size!r} is not supported by the planner: its groups are aligned "
                         f"powers of two, which tile power-of-two world sizes only (1, 2, 4, 8, ..., 256, ...)")


def candidate_groups(world_size: int) -> list[tuple[int, ...]]:
    """Every group a plan can use: for each power-of-two size d, the aligned blocks [k*d, (k+1)*d).
    A runtime builds these process groups once at start (each rank is in log2(N) + 1 of them)."""
    return [tuple(range(k * d, (k + 1) * d)) for d in degrees(world_size) for k in range(world_size // d)]


def place_groups(sizes: list[int], world_size: int) -> list[tuple[int, ...]]:
    """Disjoint aligned rank blocks for group sizes (powers of two summing to <= world_size), in the
    order given: largest first, each at the next offset (aligned, since sizes only shrink)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    out, offset = [None] * len(sizes), 0
    for i in order:
        out[i] = tuple(range(offset, offset + sizes[i]))
        offset += sizes[i]
    assert offset <= world_size, (sizes, world_size)
    return out


# ---------------------------------------------------------------- the plan

def plan_scatter(seq_lens, world_size: int, *, max_tokens_per_rank: int, cost_model: CostModel | None = None,
                 time_limit_s: float = 1.0, solver: str = "cbc") -> Plan:
    """Scatter a batch's sequences over SP groups (see the module docstring).

    seq_lens: tokens of each sequence (seq_id = index); world_size: ranks (a power of two);
    max_tokens_per_rank: tokens one rank holds at once; time_limit_s: the whole plan's budget
    (0: the greedy plan only); solver: "cbc" (PuLP's bundled CBC) or "highs" (highspy).
    A sequence that fits no group: ValueError naming it.
    """
    start = time.perf_counter()
    cm = cost_model or CostModel()
    lens = [int(n) for n in seq_lens]
    if any(n != m for n, m in zip(lens, seq_lens)):
        raise ValueError("seq_lens must be integers")
    if not isinstance(max_tokens_per_rank, (int, float)) or max_tokens_per_rank <= 0:
        raise ValueError(f"max_tokens_per_rank must be > 0, got {max_tokens_per_rank!r}")
    if time_limit_s < 0:
        raise ValueError(f"time_limit_s must be >= 0, got {time_limit_s!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    usable = [d for d in degrees(world_size) if cm.supports(d)]
    cap = max_tokens_per_rank
    for i, n in enumerate(lens):
        if n <= 0:
            raise ValueError(f"sequence {i} has length {n}; lengths must be > 0")
        if n > world_size * cap:
            raise ValueError(f"sequence {i} ({n} tokens) does not fit the whole cluster: world_size {world_size} x "
                             f"max_tokens_per_rank {cap} = {world_size * cap} tokens")
        if n > usable[-1] * cap:
            raise ValueError(f"sequence {i} ({n} tokens) needs a group of more than {usable[-1]} ranks, but "
                             f"strategy {cm.strategy!r} needs the group size to divide heads_q={cm.heads_q} and "
                             f"heads_kv={cm.heads_kv}; use a ring strategy")
    deadline = start + time_limit_s
    if not lens:
        return Plan([], 0.0, "greedy", time.perf_counter() - start)

    microbatches, used_lp = [], False
    batches = split_microbatches(lens, world_size, cap, cm, usable)
    for m, (ids, best) in enumerate(batches):
        budget = (deadline - time.perf_counter()) / (len(batches) - m) - SOLVER_OVERHEAD_S
        if budget > 0:
            lp = lp_microbatch(ids, lens, world_size, cap, cm, usable, best, budget, solver)
            if lp is not None and makespan(lp, lens, cm) <= makespan(best, lens, cm):
                best, used_lp = lp, True
        microbatches.append(best)
    predicted = sum(makespan(mb, lens, cm) for mb in microbatches)
    return Plan(microbatches, predicted, "lp" if used_lp else "greedy", time.perf_counter() - start)


def plan_on_rank(seq_lens, world_size: int, *, src: int = 0, group=None, **kwargs) -> Plan:
    """Global rank `src` plans (plan_scatter with these arguments) and broadcasts the plan over
    `group` (torch.distributed, the default group when None), so every rank runs the same plan even
    where a time-limited solve would differ between hosts. Call it on every rank of the group; the
    other ranks' arguments are not used. A ValueError on `src` is raised on every rank."""
    import torch.distributed as dist

    box = [None]
    if dist.get_rank() == src:
        try:
            box[0] = plan_scatter(seq_lens, world_size, **kwargs)
        except ValueError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=src, group=group)
    if isinstance(box[0], ValueError):
        raise box[0]
    return box[0]


def makespan(groups: list[Group], lens: list[int], cm: CostModel) -> float:
    """The slowest group's time in a micro-batch."""
    return max((cm.group_time([lens[i] for i in g.seq_ids], len(g.ranks)) for g in groups), default=0.0)


def split_microbatches(lens, world_size, cap, cm, usable) -> list[tuple[list[int], list[Group]]]:
    """(sequence ids, greedy plan) per micro-batch: as few micro-batches as the greedy plan can place,
    the tokens balanced between them (longest first, each to the micro-batch with the fewest tokens)."""
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    count = max(1, math.ceil(sum(lens) / (world_size * cap)))
    while True:
        batches, tokens = [[] for _ in range(count)], [0] * count
        for i in order:
            m = min(range(count), key=lambda b: (tokens[b], b))
            batches[m].append(i)
            tokens[m] += lens[i]
        plans = [greedy_microbatch(ids, lens, world_size, cap, cm, usable) if ids else [] for ids in batches]
        if all(p is not None for p in plans):
            return [(sorted(ids), p) for ids, p in zip(batches, plans) if ids]
        count += 1


def greedy_microbatch(ids, lens, world_size, cap, cm, usable) -> list[Group] | None:
    """The best homogeneous plan: for each degree, N / degree groups filled longest-time first, each
    sequence to the least-loaded group it fits; the degree with the smallest makespan (None: none fits)."""
    best, best_time = None, math.inf
    longest = max(lens[i] for i in ids)
    for d in usable:
        filled = fill(ids, lens, world_size // d, d, cap, cm) if longest <= d * cap else None
        if filled is None:
            continue
        groups = [Group(tuple(range(g * d, (g + 1) * d)), sorted(members)) for g, members in enumerate(filled)
                  if members]
        t = makespan(groups, lens, cm)
        if t < best_time:
            best, best_time = groups, t
    return best


# ---------------------------------------------------------------- the program

def buckets(ids, lens) -> list[list[int]]:
    """Sequence ids grouped by length: one bucket per distinct length up to MAX_BUCKETS, else
    MAX_BUCKETS runs of the sorted lengths with about equal tokens (long sequences get their own)."""
    order = sorted(ids, key=lambda i: (lens[i], i))
    distinct = sorted({lens[i] for i in ids})
    if len(distinct) <= MAX_BUCKETS:
        return [[i for i in order if lens[i] == n] for n in distinct]
    out, total, acc = [[]], sum(lens[i] for i in ids), 0
    for i in order:
        if out[-1] and acc >= total * len(out) / MAX_BUCKETS:
            out.append([])
        out[-1].append(i)
        acc += lens[i]
    return out


def lp_solver(name: str, time_limit_s: float):
    """A PuLP solver for `name`, or None when PuLP or the solver is not installed or no time is left."""
    if time_limit_s < MIN_SOLVE_S:
        return None
    try:
        import pulp
    except ImportError:
        return None
    with warnings.catch_warnings():  # PuLP 3.3 warns that 4.0 drops the bundled CBC
        warnings.simplefilter("ignore", DeprecationWarning)
        if name == "highs":
            s = pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=1)
        else:  # PuLP 4 (Python >= 3.12) has no bundled CBC: COIN_CMD finds a cbc on the PATH
            cbc = getattr(pulp, "PULP_CBC_CMD", None) or pulp.COIN_CMD
            s = cbc(msg=False, timeLimit=time_limit_s, threads=1, warmStart=True)
    return s if s.available() else None


def lp_microbatch(ids, lens, world_size, cap, cm, usable, warm: list[Group], time_limit_s: float,
                  solver: str) -> list[Group] | None:
    """The micro-batch's program (None: no solver, no solution in time, or a solution that breaks a
    rank's memory with the real lengths). Small instances get the exact program over group slots;
    larger ones the pooled program (groups of one size as a pool), rounded longest-first."""
    deadline = time.perf_counter() + time_limit_s
    backend = lp_solver(solver, time_limit_s)
    if backend is None:
        return None
    bks = buckets(ids, lens)
    eligible = {d: [b for b, members in enumerate(bks) if max(lens[i] for i in members) <= d * cap]
                for d in usable}
    slots = [(d, j) for d in usable for j in range(min(world_size // d, sum(len(bks[b]) for b in eligible[d])))]
    if sum(len(eligible[d]) for d, _ in slots) <= SLOT_VARS:
        return slot_program(bks, lens, world_size, cap, cm, eligible, slots, warm, backend)
    return pooled_program(bks, lens, world_size, cap, cm, eligible, warm, solver, deadline)


def solve(prob, backend) -> bool:
    """Run the solver; True when it left a solution to use: proven optimal or feasible (a
    time-limited solve can say "Optimal" in its status string without either, so check sol_status).
    A solver that fails to run (CBC stopped at its limit while writing) counts as no solution."""
    import pulp

    try:
        prob.solve(backend)
    except pulp.PulpSolverError:
        return False
    return prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)


def bucket_terms(bks, lens, cm, usable):
    """Per bucket: count, mean length, and mean token_time per degree (exact sums over the bucket)."""
    count = [len(b) for b in bks]
    mean_len = [sum(lens[i] for i in b) / len(b) for b in bks]
    mean_t = {(b, d): sum(cm.token_time(lens[i], d) for i in bks[b]) / count[b] for b in range(len(bks)) for d in usable}
    return count, mean_len, mean_t


def slot_program(bks, lens, world_size, cap, cm, eligible, slots, warm, backend) -> list[Group] | None:
    """Exact program: binary y[d, j] uses the j-th group slot of size d; integer n[b, d, j] sequences of
    bucket b run there; T >= every used slot's time; memory per slot; sizes sum to <= world_size."""
    import pulp

    count, mean_len, mean_t = bucket_terms(bks, lens, cm, list(eligible))
    prob = pulp.LpProblem("scatter", pulp.LpMinimize)
    T = prob.add_variable("T", lowBound=0)
    y = {s: prob.add_variable(f"y_{s[0]}_{s[1]}", cat="Binary") for s in slots}
    n = {(b, s): prob.add_variable(f"n_{b}_{s[0]}_{s[1]}", lowBound=0, upBound=count[b], cat="Integer")
         for s in slots for b in eligible[s[0]]}
    prob += T
    for b in range(len(bks)):
        prob += pulp.lpSum(v for (bb, _), v in n.items() if bb == b) == count[b]
    for s in slots:
        d, j = s
        mine = [(b, n[b, s]) for b in eligible[d]]
        prob += pulp.lpSum(mean_len[b] * v for b, v in mine) <= d * cap * y[s]
        prob += pulp.lpSum(mean_t[b, d] * v for b, v in mine) + cm.pass_time(d) * y[s] <= T
        if j > 0:
            prob += y[d, j - 1] >= y[s]  # slots of one size fill in order: fewer symmetric solutions
    prob += pulp.lpSum(s[0] * y[s] for s in slots) <= world_size

    # warm start: the greedy plan's groups as the first slots of their size
    bucket_of = {i: b for b, members in enumerate(bks) for i in members}
    for v in [*y.values(), *n.values()]:
        v.setInitialValue(0)
    used = {}
    for g in warm:
        d = len(g.ranks)
        s = (d, used.get(d, 0))
        used[d] = s[1] + 1
        y[s].setInitialValue(1)
        for i in g.seq_ids:
            v = n[bucket_of[i], s]
            v.setInitialValue(v.varValue + 1)
    T.setInitialValue(makespan(warm, lens, cm))

    if not solve(prob, backend):
        return None
    chosen = [s for s in slots if y[s].varValue > 0.5]
    want = {(b, s): int(round(n[b, s].varValue)) for s in chosen for b in eligible[s[0]]}
    members = {s: [] for s in chosen}
    tokens = {s: 0 for s in chosen}
    for b, bucket in enumerate(bks):  # the bucket's real sequences, longest first, to the emptiest slot due one
        for i in sorted(bucket, key=lambda i: (-lens[i], i)):
            due = [s for s in chosen if want.get((b, s), 0) > 0]
            if not due:
                return None
            s = min(due, key=lambda s: (tokens[s] / s[0], s))
            want[b, s] -= 1
            members[s].append(i)
            tokens[s] += lens[i]
    chosen = [s for s in chosen if members[s]]
    if any(tokens[s] > s[0] * cap for s in chosen):
        return None
    ranks = place_groups([s[0] for s in chosen], world_size)
    return [Group(r, sorted(members[s])) for r, s in zip(ranks, chosen)]


def pooled_program(bks, lens, world_size, cap, cm, eligible, warm, solver, deadline) -> list[Group] | None:
    """The groups of one size d as a pool: integer k_d groups and m[b, d] sequences of bucket b among
    them (fractional in the program, made whole by largest remainders). For a target time T the pool's work must fit k_d * T and no sequence in it may take longer
    than T: linear once T is fixed, so T steps down from the best plan's makespan (feasibility
    near the best is quick to find; far below it, slow to refute), each feasible solution rounded
    (longest-first placement in each pool) and kept when its real makespan is better."""
    import pulp

    usable = list(eligible)
    count, mean_len, mean_t = bucket_terms(bks, lens, cm, usable)
    longest_t = {(b, d): max(cm.token_time(lens[i], d) for i in bks[b]) + cm.pass_time(d)
                 for b in range(len(bks)) for d in usable}
    best, best_t = None, makespan(warm, lens, cm)
    lo = max(min(longest_t[b, d] for d in usable if b in eligible[d]) for b in range(len(bks)))
    step = 0.04  # aim this fraction below the best plan so far: twice as far after a win, half after a miss
    last_s = 0.0  # the previous round's wall time: a round starts only if one as long still fits
    while step >= 0.005 and best_t * (1 - step) >= lo:
        round_start = time.perf_counter()
        backend = lp_solver(solver, deadline - round_start - max(SOLVER_OVERHEAD_S, last_s))
        if backend is None:
            break
        target = best_t * (1 - step)
        prob = pulp.LpProblem("scatter_pooled", pulp.LpMinimize)
        k = {d: prob.add_variable(f"k_{d}", lowBound=0, upBound=world_size // d, cat="Integer") for d in usable}
        m = {(b, d): prob.add_variable(f"m_{b}_{d}", lowBound=0, upBound=count[b])  # counts: rounded below
             for d in usable for b in eligible[d] if longest_t[b, d] <= target}
        # fewest rank-seconds of work: sequences on the sizes that run them cheapest, ranks to spare
        prob += pulp.lpSum(d * (mean_t[b, d] * v) for (b, d), v in m.items()) + pulp.lpSum(
            d * cm.pass_time(d) * k[d] for d in usable)
        prob += pulp.lpSum(d * k[d] for d in usable) <= world_size
        for b in range(len(bks)):
            prob += pulp.lpSum(m[b, d] for d in usable if (b, d) in m) == count[b]
        for d in usable:
            mine = [b for b in eligible[d] if (b, d) in m]
            prob += pulp.lpSum(mean_len[b] * m[b, d] for b in mine) <= d * cap * k[d]
            prob += pulp.lpSum(mean_t[b, d] * m[b, d] for b in mine) <= (target - cm.pass_time(d)) * k[d]
        groups = None
        if solve(prob, backend):
            pools = {d: int(round(k[d].varValue)) for d in usable}
            groups = round_pools(bks, lens, world_size, cap, cm, pools, whole_counts(m, count))
        t = makespan(groups, lens, cm) if groups else math.inf
        if t < best_t:
            best, best_t, step = groups, t, step * 2
        else:
            step /= 2
        last_s = time.perf_counter() - round_start
    return best


def whole_counts(m, count) -> dict:
    """Fractional bucket counts per size -> whole ones with the same totals (largest remainders first)."""
    out = {key: math.floor(v.varValue + 1e-9) for key, v in m.items()}
    for b, total in enumerate(count):
        keys = sorted((key for key in m if key[0] == b), key=lambda key: (out[key] - m[key].varValue, key))
        for key in keys[:total - sum(out[key] for key in keys)]:
            out[key] += 1
    return out


def round_pools(bks, lens, world_size, cap, cm, pools, taken) -> list[Group] | None:
    """Groups from a pooled solution: each bucket's longest sequences to the largest sizes, longest
    first into each pool; spare ranks become extra groups of the slowest pool while they fit."""
    members = {d: [] for d in pools}
    for b, bucket in enumerate(bks):
        order = sorted(bucket, key=lambda i: (-lens[i], i))
        for d in sorted(pools, reverse=True):
            take = taken.get((b, d), 0)
            members[d] += order[:take]
            order = order[take:]
        if order:
            return None
    spare = world_size - sum(d * n for d, n in pools.items())
    filled = {}
    for d, ids in members.items():
        if ids:
            filled[d] = fill(ids, lens, pools[d], d, cap, cm)
            if filled[d] is None:
                return None
    while True:  # spare ranks: more groups for the slowest pool that fits in them, while that helps
        times = {d: max(cm.group_time([lens[i] for i in g], d) for g in gs) for d, gs in filled.items()}
        fits = [d for d in filled if d <= spare]
        if not fits or max(times[d] for d in fits) < max(times.values()):
            break
        d = max(fits, key=lambda d: (times[d], d))
        for add in sorted({max(1, min(spare // d, pools[d] // 2)), 1}, reverse=True):  # many at once, else one
            more = fill(members[d], lens, pools[d] + add, d, cap, cm)
            if max(cm.group_time([lens[i] for i in g], d) for g in more) < times[d]:
                break
        else:
            break
        pools[d] += add
        spare -= d * add
        filled[d] = more
    sizes, groups = [], []
    for d, gs in filled.items():
        for g in gs:
            if g:
                sizes.append(d)
                groups.append(sorted(g))
    return [Group(r, g) for r, g in zip(place_groups(sizes, world_size), groups)]


def fill(ids, lens, k, d, cap, cm) -> list[list[int]] | None:
    """Longest-time-first placement of `ids` into k groups of d ranks, each to the least-loaded group
    with room (None: one does not fit)."""
    if k <= 0:
        return None
    order = sorted(ids, key=lambda i: (-cm.token_time(lens[i], d), i))
    heap = [(0.0, g) for g in range(k)]  # (load, group)
    tokens, members = [0] * k, [[] for _ in range(k)]
    for i in order:
        skipped, placed = [], False
        while heap:
            load, g = heapq.heappop(heap)
            if tokens[g] + lens[i] <= d * cap:
                tokens[g] += lens[i]
                members[g].append(i)
                heapq.heappush(heap, (load + cm.token_time(lens[i], d), g))
                placed = True
                break
            skipped.append((load, g))
        for item in skipped:
            heapq.heappush(heap, item)
        if not placed:
            return None
    return members
