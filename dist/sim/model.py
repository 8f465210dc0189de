"""Performance model of sequence-parallel attention: bytes per rank and step time per strategy.

The model builds each strategy's schedule step by step, rank by rank, with the same block plan the
implementation uses (dist.ringattn.layout.block), so bytes agree with what the code sends: per step
and rank the block flops and the messages (src -> dst bytes). dist.sim.timeline then replays the
schedule on an asynchronous per-rank timeline: a rank posts its step's messages, computes, and goes
on when its compute is done, its messages in have arrived and its messages out are released (a
sender is released while up to LinkProfile.send_buffer_bytes are still in socket buffers); messages
flow at max-min fair rates over one NIC per rank (a switch) or one cable per pair (per_peer: a
mesh), each direction at bandwidth_Bps, at `duplex` of it while the other direction carries data.
all-gather and Ulysses do not overlap: their collectives wait for every rank and add to compute, at
the collective rates the link profile measured.

Compute comes from flops at a rate (ComputeProfile); what a schedule adds beyond its kernels'
flops (smaller blocks, merges, gradient sums) is not modelled here, and the benchmarks measure it
(a strategy's "-nocomm" run) and scale the rate to it. When the ranks share a host's CPU cores
(ComputeProfile.cores: the testbed and loopback runs on one machine) the ranks computing at one
moment share the cores, and messages and compute slow each other: a transfer waits for cores the
ranks hold (TCP stack, veth/bridge forwarding, shaping, wake-ups) and takes CPU from them. The link
profile carries both, measured on that link with every rank computing (benchmarks/bench_links.py's
interference pattern: rate_while_computing f, compute_lost_while_moving g). On shared cores the
network stack takes the cores the probe's ranks lost while bytes move, the computing ranks share
the rest, and messages run at f while the cores are as busy as in the probe; with a device per
rank a rank's compute loses g while its own messages move and they run at f while either end
computes (dist/sim/timeline.py has the details). GPU links move bytes by DMA and each rank has its
own device (cores = None, f = 1, g = 0, nothing buffered).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace

from dist.plan import RING_STRATEGIES, SP_STRATEGIES, block, diag_parts, diag_tail, q_needed, relay_start

from .timeline import replay

STRATEGIES = SP_STRATEGIES
LSE_BYTES = 4  # lse is float32


@dataclass(frozen=True)
class LinkProfile:
    """A link between ranks.

    bandwidth_Bps: one-way bytes/s per rank; latency_s: per message; duplex: per-direction rate when
    both directions carry data at once, as a fraction of one-way (1.0 = full duplex);
    alltoall_Bps: per-rank rate of an all-to-all (None: bandwidth_Bps * duplex); alltoall_calls_Bps:
    the same for calls made back to back (Ulysses' q, k, v; None: alltoall_Bps): over TCP they ran
    3-14% away from one call on the testbed (benchmarks/bench_links.py measures both);
    rate_while_computing: the link's rate while the ranks compute on the cores its transfers also
    need (ranks sharing a host), as a fraction of its idle rate (1 for DMA/RDMA links);
    compute_lost_while_moving: the fraction of compute progress lost while the link carries data
    (0 for DMA/RDMA links), the mean over ranks; compute_lost_slowest: the same for the most-slowed
    rank (None: not measured, the mean). All measured per link setting with every rank computing
    (benchmarks/bench_links.py's interference pattern), not constants of the machine;
    per_peer: every pair of ranks has its own link (a mesh of cables, the testbed's mesh), so a
    rank's messages to different peers do not share a rate; False: one NIC per rank (a switch);
    allgather_Bps: bytes per second reaching each rank in an all-gather as the backend runs it (None:
    modelled as a ring of shifts over bandwidth_Bps and duplex);
    send_buffer_bytes: how much of a message is still on its way when its send completes (TCP socket
    buffers: measured by benchmarks/bench_links.py; 0 for DMA/RDMA links, whose sends complete on
    delivery).
    """

    name: str
    bandwidth_Bps: float
    latency_s: float
    duplex: float = 1.0
    alltoall_Bps: float | None = None
    source: str = ""
    per_peer: bool = False
    allgather_Bps: float | None = None
    rate_while_computing: float = 1.0
    compute_lost_while_moving: float = 0.0
    send_buffer_bytes: float = 0.0
    compute_lost_slowest: float | None = None
    alltoall_calls_Bps: float | None = None

    def __post_init__(self):
        if self.bandwidth_Bps <= 0 or self.latency_s < 0 or not 0 < self.duplex <= 1:
            raise ValueError(f"link {self.name!r}: bandwidth_Bps must be > 0, latency_s >= 0 and duplex in (0, 1]")
        if not 0 < self.rate_while_computing <= 1 or not 0 <= self.compute_lost_while_moving < 1:
            raise ValueError(f"link {self.name!r}: rate_while_computing must be in (0, 1] and "
                             f"compute_lost_while_moving in [0, 1)")
        if self.send_buffer_bytes < 0:
            raise ValueError(f"link {self.name!r}: send_buffer_bytes must be >= 0")
        if self.compute_lost_slowest is not None and not (
                self.compute_lost_while_moving <= self.compute_lost_slowest < 1):
            raise ValueError(f"link {self.name!r}: compute_lost_slowest must be in "
                             f"[compute_lost_while_moving, 1)")

    @property
    def lost_by_slowest(self) -> float:
        """The most-slowed rank's fraction of compute lost while bytes move (the mean where not measured)."""
        return self.compute_lost_while_moving if self.compute_lost_slowest is None else self.compute_lost_slowest

    def transfer_s(self, sent: float, recv: float, messages: int) -> float:
        """Time to send `sent` and receive `recv` bytes: the part both directions carry at once at the
        duplex rate, the rest of the longer one at the one-way rate."""
        if not sent and not recv:
            return 0.0
        both = min(sent, recv)
        return (messages * self.latency_s + both / (self.bandwidth_Bps * self.duplex)
                + (max(sent, recv) - both) / self.bandwidth_Bps)

    def alltoall_s(self, sent: float, messages: int, calls: int = 1) -> float:
        """An all-to-all step in which a rank sends `sent` bytes in `calls` calls made back to back."""
        rate = self.alltoall_Bps or self.bandwidth_Bps * self.duplex
        if calls > 1 and self.alltoall_calls_Bps:
            rate = self.alltoall_calls_Bps
        return messages * self.latency_s + sent / rate

    def allgather_s(self, recv: float, messages: int, world: int) -> float:
        """An all-gather in which each rank receives `recv` bytes (and sends its own share on)."""
        if self.allgather_Bps:
            return messages * self.latency_s + recv / self.allgather_Bps
        if world <= 2:  # next == prev: both directions share one connection, as in an all-to-all
            return self.alltoall_s(recv, messages)
        # gloo's all-gather is a ring: a rank sends to next while it receives from prev (a shift); on
        # per-peer links next and prev are different links, so each carries one direction
        return self.transfer_s(recv, 0 if self.per_peer else recv, messages)


@dataclass(frozen=True)
class ComputeProfile:
    """Attention kernel speed: flop/s of the forward and of the backward (backward flops = 2.5 x forward)
    of one rank; cores: the number of CPU cores all ranks share (None: a device per rank, a GPU)."""

    name: str
    fwd_flops: float
    bwd_flops: float
    source: str = ""
    cores: float | None = None

    def shared(self, cores: float, slowdown: float = 1.0) -> "ComputeProfile":
        """This profile for single-threaded ranks that all run on `cores` cores of one machine (the
        testbed's "hosts", loopback runs): dist.sim.timeline shares the cores among the ranks
        computing at each moment (after the network stack's share while bytes move).
        slowdown: how much slower the kernel runs when every rank computes at once than alone (shared
        caches, memory bandwidth and, beyond `cores` ranks, time slices), measured by the caller."""
        return replace(self, cores=float(cores), fwd_flops=self.fwd_flops / slowdown,
                       bwd_flops=self.bwd_flops / slowdown,
                       source=f"{self.source}; ranks share {cores:g} cores, {slowdown:.3f}x slower all at once")


FREE_LINK = LinkProfile("free", 1e30, 0.0, alltoall_Bps=1e30, allgather_Bps=1e30)  # messages cost nothing

# Effective rates, derated from nominal (NVLink 4: 450 GB/s per direction per H100 SXM; PCIe Gen4/Gen5
# x16: 32/64 GB/s per direction; InfiniBand NDR 400 Gb/s = 50 GB/s, HDR 200 Gb/s = 25 GB/s per port).
LINK_PROFILES = {
    p.name: p for p in [
        LinkProfile("nvlink-h100", 370e9, 5e-6, 1.0, 330e9, "H100 SXM NVLink 4, ~82% of 450 GB/s nominal"),
        LinkProfile("pcie-gen4", 24e9, 10e-6, 0.8, 18e9, "PCIe Gen4 x16 P2P, ~75% of 32 GB/s; bidirectional 80%"),
        LinkProfile("pcie-gen5", 48e9, 10e-6, 0.8, 36e9, "PCIe Gen5 x16 P2P, ~75% of 64 GB/s; bidirectional 80%"),
        LinkProfile("ib-200", 23e9, 5e-6, 1.0, 20e9, "InfiniBand HDR 200 Gb/s, one NIC per GPU"),
        LinkProfile("ib-400", 46e9, 5e-6, 1.0, 40e9, "InfiniBand NDR 400 Gb/s, one NIC per GPU"),
        LinkProfile("gloo-loopback", 1.2e9, 300e-6, 1.0, None, "rough: gloo TCP on one host's loopback "
                    "(DIST_SHM=0); benchmarks/bench_ringattn.py measures it"),
        LinkProfile("cpu-shm", 3.4e9, 150e-6, 1.0, None, "rough: ranks of one host over dist.comm's shared "
                    "memory; benchmarks/bench_ringattn.py measures it"),
    ]
}

COMPUTE_PROFILES = {
    p.name: p for p in [
        ComputeProfile("h100-bf16", 350e12, 250e12, "FlashAttention-2-class kernel on H100, bf16, long blocks"),
        ComputeProfile("cpu-1-thread", 43e9, 43e9, "torch CPU flash kernel, fp32, one thread (NOTES: 1.396 s "
                       "for s=4096, 8 heads, d=64 causal fwd+bwd)"),
    ]
}


def link_profile(entry: dict) -> LinkProfile:
    """A LinkProfile from one JSON entry (what load_link_profiles reads and benchmark results store);
    fields it does not know (group_size, notes, figures of older probes) are left aside."""
    if not isinstance(entry.get("per_peer", False), bool):
        raise ValueError(f"per_peer must be true or false, got {entry.get('per_peer')!r}")

    def number(key, default=None):
        value = entry.get(key, default)
        return None if value is None else float(value)

    missing = [key for key in ("name", "bandwidth_Bps", "latency_s") if entry.get(key) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")

    return LinkProfile(
        name=entry["name"], bandwidth_Bps=number("bandwidth_Bps"), latency_s=number("latency_s"),
        duplex=number("duplex", 1.0), alltoall_Bps=number("alltoall_Bps"), source=str(entry.get("source", "")),
        per_peer=entry.get("per_peer", False), allgather_Bps=number("allgather_Bps"),
        rate_while_computing=number("rate_while_computing", 1.0),
        compute_lost_while_moving=number("compute_lost_while_moving", 0.0),
        send_buffer_bytes=number("send_buffer_bytes") or 0.0,
        compute_lost_slowest=number("compute_lost_slowest"), alltoall_calls_Bps=number("alltoall_calls_Bps"))


def load_link_profiles(path) -> dict[str, LinkProfile]:
    """Read {"profiles": [{"name", "bandwidth_Bps", "latency_s", "duplex", "alltoall_Bps", "allgather_Bps",
    "per_peer", "rate_while_computing", "compute_lost_while_moving", "compute_lost_slowest",
    "send_buffer_bytes", "alltoall_calls_Bps"}, ...]} (all but the first three
    optional)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'profiles' list")
    out = {}
    for i, entry in enumerate(data["profiles"]):
        try:
            out[entry["name"]] = link_profile(entry)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: profile {i} lacks or mistypes a field: {e}") from None
    return out


@dataclass(frozen=True)
class Workload:
    """One attention call sharded over `world` ranks: local shapes as ring_attention sees them."""

    batch: int
    local_seq: int
    heads_q: int
    heads_kv: int
    head_dim: int
    world: int
    causal: bool = True
    layout: str = "zigzag"
    itemsize: int = 2
    diag_tail: float = 0.5  # TokenRing's last local part, a fraction of the rows (layout.diag_tail: 0.5 on CUDA)

    @property
    def acc_itemsize(self) -> int:
        return 8 if self.itemsize == 8 else 4

    def q_row(self) -> int:  # bytes of one token's queries (or out, dO, dQ)
        return self.batch * self.heads_q * self.head_dim * self.itemsize

    def kv_row(self) -> int:  # bytes of one token's K and V
        return self.batch * 2 * self.heads_kv * self.head_dim * self.itemsize

    def lse_row(self) -> int:
        return self.batch * self.heads_q * LSE_BYTES

    def block_flops(self, a: int, b: int) -> float:
        """Forward flops of block (queries of a, keys of b); backward is 2.5 x this."""
        blk = block(a, b, self.local_seq, self.layout, self.causal)
        if blk is None:
            return 0.0
        rows, cols = self.local_seq - blk.q_start, blk.k_stop - blk.k_start
        pairs = rows * (rows + 1) / 2 if blk.causal else rows * cols
        return 4.0 * self.batch * self.heads_q * self.head_dim * pairs


    def diag_part_flops(self, q_start: int, k_start: int, k_stop: int) -> float:
        """Forward flops of one part of a rank's own block (see layout.diag_parts): query rows
        [q_start, n) with keys [k_start, k_stop), top-left causal when causal."""
        rows, cols = self.local_seq - q_start, k_stop - k_start
        if self.causal:  # row i sees min(i + 1, cols) keys
            pairs = rows * (rows + 1) / 2 if rows <= cols else cols * (cols + 1) / 2 + (rows - cols) * cols
        else:
            pairs = rows * cols
        return 4.0 * self.batch * self.heads_q * self.head_dim * pairs


@dataclass
class Step:
    """One step of a schedule: per-rank flops (forward-equivalent x factor), bytes sent/received, messages;
    pairs: {(src, dst): bytes} of the point-to-point messages (what per-peer links need)."""

    flops: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    recv: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    pairs: dict = field(default_factory=dict)
    overlapped: bool = True  # False: a collective that neither overlaps nor is overlapped
    collective: str = "all_to_all"  # when not overlapped: "all_to_all", or "all_gather" (a ring, as gloo runs it)
    calls: int = 1  # collective calls made back to back in this step (Ulysses: one per tensor)


def _new_step(p: int) -> Step:
    return Step([0.0] * p, [0] * p, [0] * p, [0] * p)


def _send(step: Step, src: int, dst: int, nbytes: int) -> None:
    if nbytes:
        step.pairs[(src, dst)] = step.pairs.get((src, dst), 0) + nbytes
        step.sent[src] += nbytes
        step.recv[dst] += nbytes
        step.messages[src] += 1


def _tokenring(w: Workload, backward: bool) -> list[Step]:
    """Steps 0..p: the diagonal's first part, p-1 remote blocks, the last returns with the diagonal's rest."""
    p, n = w.world, w.local_seq
    travel = 2 * (w.q_row() + w.lse_row()) if backward else w.q_row()  # per query row: Q (and dO, lse, D)
    back = w.q_row() if backward else w.q_row() + w.lse_row()           # per row of a returned result
    factor = 2.5 if backward else 1.0
    parts = diag_parts(n, w.causal, w.diag_tail if p > 1 else 0.0)
    steps = []
    for t in range(p + 1 if p > 1 else 1):
        s = _new_step(p)
        for r in range(p):
            a = (r + t) % p
            if t == 0:
                s.flops[r] = factor * w.diag_part_flops(*parts[0])
            elif t < p:
                s.flops[r] = factor * w.block_flops(a, r)
            else:
                s.flops[r] = factor * w.diag_part_flops(*parts[1]) if len(parts) > 1 else 0.0
            if t < p - 1:
                _send(s, r, (r - 1) % p, (n - relay_start(a, r, p, n, w.layout, w.causal)) * travel)
            if t >= 2:  # results of step t-1 go back to their owner
                _send(s, r, (r + t - 1) % p, (n - q_needed((r + t - 1) % p, r, n, w.layout, w.causal)) * back)
        steps.append(s)
    return steps


def _ring(w: Workload, backward: bool) -> list[Step]:
    p, n = w.world, w.local_seq
    factor = 2.5 if backward else 1.0
    dkv = n * w.kv_row() // w.itemsize * w.acc_itemsize
    steps = []
    for t in range(p):
        s = _new_step(p)
        for r in range(p):
            s.flops[r] = factor * w.block_flops(r, (r - t) % p)
            if t < p - 1:
                _send(s, r, (r + 1) % p, n * w.kv_row())
            if backward and t >= 1:  # the dK/dV accumulator of the previous step
                _send(s, r, (r + 1) % p, dkv)
        steps.append(s)
    if backward and p > 1:
        s = _new_step(p)
        for r in range(p):
            _send(s, r, (r + 1) % p, dkv)
        steps.append(s)
    return steps


def _allgather(w: Workload, backward: bool) -> list[Step]:
    p, n = w.world, w.local_seq
    size = n * w.kv_row() if not backward else n * w.kv_row() // w.itemsize * w.acc_itemsize
    coll = _new_step(p)
    coll.overlapped = False
    coll.collective = "all_to_all" if backward else "all_gather"  # dK/dV go back by all_to_all (a reduce-scatter)
    for r in range(p):
        coll.sent[r] = coll.recv[r] = (p - 1) * size
        coll.messages[r] = p - 1
    comp = _new_step(p)
    for r in range(p):
        comp.flops[r] = (2.5 if backward else 1.0) * sum(w.block_flops(r, b) for b in range(p))
    steps = [comp, coll] if backward else [coll, comp]
    return steps if p > 1 else [comp]


def _ulysses(w: Workload, backward: bool) -> list[Step]:
    p, n = w.world, w.local_seq
    share = (p - 1) / p
    if not backward:
        first = n * (w.q_row() + w.kv_row()) * share   # q, k, v scatter heads / gather sequence
        last = n * w.q_row() * share                     # out back
    else:
        first = n * w.q_row() * share                    # dout
        last = n * (w.q_row() + w.kv_row()) * share      # dq, dk, dv
    calls = (3, 1) if not backward else (1, 3)           # one all_to_all per tensor, one after another
    total_flops = sum(w.block_flops(a, b) for a in range(p) for b in range(p)) / p * (2.5 if backward else 1.0)
    steps = []
    for nbytes, flops, n_calls in ((first, 0.0, calls[0]), (0, total_flops, 0), (last, 0.0, calls[1])):
        s = _new_step(p)
        s.overlapped = nbytes == 0
        s.calls = n_calls or 1
        for r in range(p):
            s.flops[r] = flops
            s.sent[r] = s.recv[r] = int(nbytes) if p > 1 else 0
            # a latency per call: the backend posts a call's p - 1 peer messages at once
            s.messages[r] = n_calls if nbytes and p > 1 else 0
        steps.append(s)
    return steps


_SCHEDULES = {"tokenring": _tokenring, "ring": _ring, "allgather": _allgather, "ulysses": _ulysses}


def schedule(strategy: str, w: Workload, backward: bool = False) -> list[Step]:
    if strategy not in _SCHEDULES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return _SCHEDULES[strategy](w, backward)


def bytes_per_rank(strategy: str, w: Workload, backward: bool | None = None) -> list[int]:
    """Bytes each rank sends (forward, backward, or both when backward is None)."""
    passes = (False, True) if backward is None else (backward,)
    out = [0] * w.world
    for bw in passes:
        for s in schedule(strategy, w, bw):
            for r in range(w.world):
                out[r] += s.sent[r]
    return out


@dataclass
class Prediction:
    strategy: str
    fwd_s: float
    bwd_s: float
    compute_s: float          # the same schedule with free communication
    bytes_per_rank: int       # max over ranks, forward + backward

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s

    @property
    def overhead(self) -> float:
        """total / compute-only - 1."""
        return self.total_s / self.compute_s - 1.0 if self.compute_s else 0.0


def _time(steps: list[Step], link: LinkProfile, compute: ComputeProfile, backward: bool) -> tuple[float, float]:
    """(modelled time of one pass, the same pass with free messages: its compute alone)."""
    return replay(steps, link, compute, backward), replay(steps, FREE_LINK, compute, backward)


def predict(strategy: str, w: Workload, link: LinkProfile, compute: ComputeProfile) -> Prediction:
    """Modelled forward + backward time of one attention call on every rank."""
    fwd, cf = _time(schedule(strategy, w, False), link, compute, False)
    bwd, cb = _time(schedule(strategy, w, True), link, compute, True)
    return Prediction(strategy, fwd, bwd, cf + cb, max(bytes_per_rank(strategy, w)))


def default_link(device_type: str = "cpu") -> LinkProfile:
    """$DIST_LINK_PROFILE (a built-in name) if set, else nvlink-h100 for CUDA and for CPU cpu-shm
    (gloo-loopback with DIST_SHM=0)."""
    import os

    cpu = "gloo-loopback" if os.environ.get("DIST_SHM", "1") == "0" else "cpu-shm"
    name = os.environ.get("DIST_LINK_PROFILE") or ("nvlink-h100" if device_type == "cuda" else cpu)
    if name not in LINK_PROFILES:
        raise ValueError(f"DIST_LINK_PROFILE must be one of {sorted(LINK_PROFILES)}, got {name!r}")
    return LINK_PROFILES[name]


def choose_strategy(q_shape, k_shape, world: int, *, causal: bool = True, layout: str = "zigzag",
                    itemsize: int = 4, device_type: str = "cpu", link: LinkProfile | None = None,
                    compute: ComputeProfile | None = None, candidates=RING_STRATEGIES) -> str:
    """The "auto" policy, for ring_attention and wrap_model alike: the strategy among `candidates` with
    the lowest modelled time (ties: fewest bytes, then the first candidate; tokenring leads the
    default ring strategies). Ulysses is a candidate only where the group size divides both head
    counts. The same answer on every rank (a pure function of the call's shapes).

    q_shape: [batch, local_seq, heads_q, dim]; k_shape: [batch, local_seq, heads_kv, dim].
    link: default_link(device_type); compute: h100-bf16 for CUDA, cpu-1-thread otherwise.
    """
    if world == 1:
        return "tokenring"
    if q_shape[2] % world or k_shape[2] % world:
        candidates = tuple(c for c in candidates if c != "ulysses")
    link = link or default_link(device_type)
    compute = compute or COMPUTE_PROFILES["h100-bf16" if device_type == "cuda" else "cpu-1-thread"]
    w = Workload(q_shape[0], q_shape[1], q_shape[2], k_shape[2], q_shape[3], world, causal, layout, itemsize,
                 diag_tail=diag_tail(device_type))
    return _fastest(w, link, compute, tuple(candidates))


@functools.lru_cache(maxsize=256)
def _fastest(w: Workload, link: LinkProfile, compute: ComputeProfile, candidates: tuple) -> str:
    """choose_strategy's pick, once per distinct call (every layer of a model asks with the same shapes)."""
    preds = [predict(s, w, link, compute) for s in candidates]
    best = min(preds, key=lambda p: (round(p.total_s, 9), p.bytes_per_rank))
    return best.strategy


def where_each_wins(links=None, compute: ComputeProfile | None = None, worlds=(2, 4, 8),
                    tokens_per_rank=(4096, 32768, 131072), gqa=(1, 8), heads_q: int = 32,
                    head_dim: int = 128, itemsize: int = 2) -> list[dict]:
    """Model every strategy over a grid; one row per case with times, the winner and its margin."""
    links = links or [LINK_PROFILES[n] for n in ("nvlink-h100", "pcie-gen4", "pcie-gen5", "ib-200", "ib-400")]
    compute = compute or COMPUTE_PROFILES["h100-bf16"]
    rows = []
    for link in links:
        for p in worlds:
            for n in tokens_per_rank:
                for g in gqa:
                    w = Workload(1, n, heads_q, heads_q // g, head_dim, p, True, "zigzag", itemsize)
                    preds = {s: predict(s, w, link, compute) for s in STRATEGIES}
                    best = min(preds.values(), key=lambda x: x.total_s)
                    rows.append({
                        "link": link.name, "world": p, "tokens_per_rank": n, "gqa": g,
                        **{f"{s}_ms": preds[s].total_s * 1e3 for s in STRATEGIES},
                        "compute_ms": preds["tokenring"].compute_s * 1e3,
                        "tokenring_overhead": preds["tokenring"].overhead,
                        "tokenring_vs_ring": preds["ring"].total_s / preds["tokenring"].total_s,
                        "best": best.strategy,
                    })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| link | P | tokens/GPU | GQA | tokenring ms | ring ms | allgather ms | ulysses ms | compute ms "
            "| TR overhead | ring/TR | best |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['link']} | {r['world']} | {r['tokens_per_rank']} | {r['gqa']} | {r['tokenring_ms']:.2f} "
                     f"| {r['ring_ms']:.2f} | {r['allgather_ms']:.2f} | {r['ulysses_ms']:.2f} | {r['compute_ms']:.2f} "
                     f"| {round(100 * r['tokenring_overhead'], 1) + 0.0:.1f}% | {r['tokenring_vs_ring']:.2f} | {r['best']} |")
    return "\n".join(lines)
