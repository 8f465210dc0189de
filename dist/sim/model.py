"""Performance model of sequence-parallel attention: bytes per rank and step time per strategy.

Built for what the runtime asks (the "auto" strategy, the planner, scaling past this machine):

- Messages: each strategy's schedule, step by step and rank by rank, from the plan the
  implementation runs (dist.plan: block, relay_start, diag_parts), so bytes and messages per step
  agree with what the code sends.
- Compute: a kernel call of F forward flops takes `call_s + F / fwd_flops` (backward: 2.5 F at
  bwd_flops), F counting the whole tiles a causal block computes (ComputeProfile.tile_q/tile_k);
  between kernels, the schedule's element-wise passes (merges of partial outputs, gradient sums,
  copies) move bytes at mem_Bps. ComputeProfile.basis says where the rates come from: "measured"
  (probed on the device, benchmarks/bench_model.py) or "flops" (a peak at a stated efficiency).
- Links: by where the group's ranks are (dist.sim.topology.Cluster: same node -> the intra-node
  profile, NVLink or PCIe; across nodes -> the inter-node one, InfiniBand or Ethernet).
- Overlap per ring step: dist.sim.timeline replays the schedule on a per-rank timeline, messages
  as flows at max-min fair rates, compute beside them (a device per rank, DMA moves the bytes).
  All-gather and Ulysses do not overlap: their collectives wait for every rank.

The validation (benchmarks/README.md) reports how far this is from measured steps, out of sample.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from dist.plan import SP_STRATEGIES, block, diag_parts, q_needed, relay_start

from .timeline import replay

STRATEGIES = SP_STRATEGIES
LSE_BYTES = 4  # lse is float32
BWD_FLOPS = 2.5  # backward flops per forward flop (recompute of P, dV, dP, dQ, dK)


@dataclass(frozen=True)
class LinkProfile:
    """A link between ranks.

    bandwidth_Bps: one-way bytes/s per rank; latency_s: per message; duplex: per-direction rate when
    both directions carry data at once, as a fraction of one-way (1.0 = full duplex);
    alltoall_Bps: bytes leaving a rank per second in an all-to-all (None: bandwidth_Bps * duplex);
    allgather_Bps: bytes reaching a rank per second in an all-gather (None: a ring of shifts over
    bandwidth_Bps and duplex); per_peer: every pair of ranks has its own link (a mesh of cables:
    a rank's messages to different peers do not share a rate); False: one NIC per rank.
    """

    name: str
    bandwidth_Bps: float
    latency_s: float
    duplex: float = 1.0
    alltoall_Bps: float | None = None
    source: str = ""
    per_peer: bool = False
    allgather_Bps: float | None = None

    def __post_init__(self):
        if self.bandwidth_Bps <= 0 or self.latency_s < 0 or not 0 < self.duplex <= 1:
            raise ValueError(f"link {self.name!r}: bandwidth_Bps must be > 0, latency_s >= 0 and duplex in (0, 1]")

    def transfer_s(self, sent: float, recv: float, messages: int) -> float:
        """Time to send `sent` and receive `recv` bytes: the part both directions carry at once at the
        duplex rate, the rest of the longer one at the one-way rate."""
        if not sent and not recv:
            return 0.0
        both = min(sent, recv)
        return (messages * self.latency_s + both / (self.bandwidth_Bps * self.duplex)
                + (max(sent, recv) - both) / self.bandwidth_Bps)

    def alltoall_s(self, sent: float, messages: int) -> float:
        """An all-to-all in which a rank sends `sent` bytes (one call: a latency per peer message)."""
        return messages * self.latency_s + sent / (self.alltoall_Bps or self.bandwidth_Bps * self.duplex)

    def allgather_s(self, recv: float, messages: int, world: int) -> float:
        """An all-gather in which each rank receives `recv` bytes (and sends its own share on)."""
        if self.allgather_Bps:
            return messages * self.latency_s + recv / self.allgather_Bps
        if world <= 2:  # next == prev: both directions share one connection, as in an all-to-all
            return self.alltoall_s(recv, messages)
        # a ring: a rank sends to next while it receives from prev (a shift); on per-peer links next
        # and prev are different links, so each carries one direction
        return self.transfer_s(recv, 0 if self.per_peer else recv, messages)


COMPUTE_BASES = ("measured", "flops")
# (query rows, keys) per tile of dist.kernels' attention kernels by device type: ATen's CPU flash kernel
# (256 x 512; 32 or 64 rows for short queries, which costs the same since they divide 512) and the
# Triton forward on CUDA (bf16/fp16 128 x 64)
KERNEL_TILES = {"cpu": (256, 512), "cuda": (128, 64)}


@functools.lru_cache(maxsize=4096)
def tiled_pairs(rows: int, cols: int, tile_q: int, tile_k: int) -> int:
    """(query, key) pairs a tiled kernel computes for a top-left causal block of rows x cols: query
    tile [m, m + tile_q) runs over every key tile up to the one holding key m + tile_q - 1 (masking
    inside it), so it costs min(cols, ceil((m + tile_q) / tile_k) * tile_k) keys per row. Tiles of
    1 x 1 give the exact causal count."""
    total = 0
    for m in range(0, rows, tile_q):
        q = min(tile_q, rows - m)
        total += q * min(cols, -(-(m + q) // tile_k) * tile_k)
    return total


def causal_pairs(rows: int, cols: int) -> int:
    """Visible pairs of a top-left causal block (row i sees min(i + 1, cols) keys)."""
    return rows * (rows + 1) // 2 if rows <= cols else cols * (cols + 1) // 2 + (rows - cols) * cols


@dataclass(frozen=True)
class ComputeProfile:
    """Time of a schedule's work on one device (one rank).

    Kernels: a call of F forward flops takes call_s + F / fwd_flops forward and
    call_s + 2.5 F / bwd_flops backward, where a causal block's F counts whole tiles of tile_q query
    rows x tile_k keys (`tiled_pairs`: a kernel masks inside a tile and skips only tiles above the
    diagonal, so a causal block no larger than a tile costs as much as a full one). Between kernels:
    merges of partial outputs, gradient sums and copies, charged as the bytes they read and write at
    mem_Bps (0: not charged).

    basis: "measured" (rates, call_s and mem_Bps probed on the device) or "flops" (a peak at a stated
    efficiency); source says which measurement or which peak and efficiency. The tiles are the
    kernel's (ATen's CPU flash kernel: 256 x 512 (fewer rows for short queries, the same cost);
    dist.kernels' Triton forward on H100: 128 x 64).
    """

    name: str
    fwd_flops: float
    bwd_flops: float
    source: str = ""
    call_s: float = 0.0
    basis: str = "flops"
    tile_q: int = 1
    tile_k: int = 1
    mem_Bps: float = 0.0

    def __post_init__(self):
        if self.fwd_flops <= 0 or self.bwd_flops <= 0 or self.call_s < 0 or self.mem_Bps < 0:
            raise ValueError(f"compute {self.name!r}: fwd_flops and bwd_flops must be > 0, call_s and mem_Bps >= 0")
        if self.tile_q < 1 or self.tile_k < 1:
            raise ValueError(f"compute {self.name!r}: tile_q and tile_k must be >= 1")
        if self.basis not in COMPUTE_BASES:
            raise ValueError(f"compute {self.name!r}: basis must be one of {COMPUTE_BASES}, got {self.basis!r}")

    @classmethod
    def at_efficiency(cls, name: str, peak_flops: float, fwd: float, bwd: float, source: str, **kw) -> "ComputeProfile":
        """A device's attention kernels at fractions `fwd` / `bwd` of its peak flop/s."""
        return cls(name, peak_flops * fwd, peak_flops * bwd,
                   f"{source}; {fwd:.0%} (fwd) / {bwd:.0%} (bwd) of {peak_flops / 1e12:g} TFLOP/s", basis="flops", **kw)

    def seconds(self, flops: float, kernels: int, backward: bool) -> float:
        """Time of `kernels` kernel calls that do `flops` flops in all (backward: flops already x 2.5)."""
        return kernels * self.call_s + flops / (self.bwd_flops if backward else self.fwd_flops)

    def kernel_flops(self, flops: float, rows: int, cols: int, causal: bool) -> float:
        """Flops a kernel call computes for a block of `flops` useful flops (tiles, see the class doc)."""
        if not causal or self.tile_q * self.tile_k == 1 or not rows or not cols:
            return flops
        return flops * tiled_pairs(rows, cols, self.tile_q, self.tile_k) / causal_pairs(rows, cols)

    def step_seconds(self, step: "Step", r: int, backward: bool) -> float:
        """Rank r's compute in one step: its kernel calls (tiled) and its element-wise bytes."""
        flops = sum(self.kernel_flops(*call) for call in step.calls[r])
        flops += step.flops[r] - sum(call[0] for call in step.calls[r])  # calls given without a shape
        moved = step.moved[r] / self.mem_Bps if self.mem_Bps else 0.0
        return self.seconds(flops, step.kernels[r], backward) + moved


FREE_LINK = LinkProfile("free", 1e30, 0.0, alltoall_Bps=1e30, allgather_Bps=1e30)  # messages cost nothing

# Effective rates, derated from nominal (NVLink 4: 450 GB/s per direction per H100 SXM; PCIe Gen4/Gen5
# x16: 32/64 GB/s per direction; InfiniBand NDR 400 Gb/s = 50 GB/s, HDR 200 Gb/s = 25 GB/s per port).
LINK_PROFILES = {
    p.name: p for p in [
        LinkProfile("nvlink-h100", 370e9, 5e-6, 1.0, 330e9, "H100 SXM NVLink 4, ~82% of 450 GB/s nominal"),
        LinkProfile("nvlink-a100", 245e9, 5e-6, 1.0, 218e9, "A100 SXM NVLink 3, ~82% of 300 GB/s nominal"),
        LinkProfile("pcie-gen4", 24e9, 10e-6, 0.8, 18e9, "PCIe Gen4 x16 P2P, ~75% of 32 GB/s; bidirectional 80%"),
        LinkProfile("pcie-gen5", 48e9, 10e-6, 0.8, 36e9, "PCIe Gen5 x16 P2P, ~75% of 64 GB/s; bidirectional 80%"),
        LinkProfile("ib-200", 23e9, 5e-6, 1.0, 20e9, "InfiniBand HDR 200 Gb/s, one NIC per GPU"),
        LinkProfile("ib-400", 46e9, 5e-6, 1.0, 40e9, "InfiniBand NDR 400 Gb/s, one NIC per GPU"),
        LinkProfile("tcp-10g", 1.1e9, 50e-6, 1.0, None, "rough: 10 GbE TCP between hosts, ~90% of 1.25 GB/s"),
        LinkProfile("gloo-loopback", 1.2e9, 300e-6, 1.0, None, "rough: gloo TCP on one host's loopback; "
                    "benchmarks/bench_model.py probes it"),
    ]
}

COMPUTE_PROFILES = {
    p.name: p for p in [
        ComputeProfile.at_efficiency("h100-bf16", 989e12, 0.35, 0.25,
                                     "FlashAttention-2-class kernel on H100 SXM, bf16, long blocks; element-wise "
                                     "passes at ~60% of 3.35 TB/s HBM3", tile_q=KERNEL_TILES["cuda"][0],
                                     tile_k=KERNEL_TILES["cuda"][1], mem_Bps=2e12),
        ComputeProfile("cpu-1-thread", 60e9, 58e9, "ATen CPU flash kernel, fp32, one thread of a 2-core AMD EPYC VM, "
                       "both cores busy (benchmarks/results/bench_model-2026-12-06.md, P = 2)", call_s=190e-6,
                       basis="measured", tile_q=KERNEL_TILES["cpu"][0], tile_k=KERNEL_TILES["cpu"][1], mem_Bps=26e9),
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
        per_peer=entry.get("per_peer", False), allgather_Bps=number("allgather_Bps"))


def load_link_profiles(path) -> dict[str, LinkProfile]:
    """Read {"profiles": [{"name", "bandwidth_Bps", "latency_s", "duplex", "alltoall_Bps", "allgather_Bps",
    "per_peer", "source"}, ...]} (all but the first three optional)."""
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
    diag_tail: float = 0.5  # TokenRing's last local part, a fraction of the rows (dist.plan.diag_tail)

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
        return self.block_call(a, b)[0]

    def block_call(self, a: int, b: int) -> tuple:
        """Block (queries of a, keys of b) as a kernel call (forward flops, rows, cols, causal)."""
        blk = block(a, b, self.local_seq, self.layout, self.causal)
        if blk is None:
            return (0.0, 0, 0, False)
        return self.part_call(blk.q_start, blk.k_start, blk.k_stop, blk.causal)

    def part_flops(self, q_start: int, k_start: int, k_stop: int, causal: bool) -> float:
        """Forward flops of query rows [q_start, local_seq) with keys [k_start, k_stop), top-left causal
        when `causal` (row i sees min(i + 1, cols) keys: dist.plan.diag_parts)."""
        return self.part_call(q_start, k_start, k_stop, causal)[0]

    def part_call(self, q_start: int, k_start: int, k_stop: int, causal: bool) -> tuple:
        """part_flops as a kernel call (forward flops, rows, cols, causal)."""
        rows, cols = self.local_seq - q_start, k_stop - k_start
        pairs = causal_pairs(rows, cols) if causal else rows * cols
        return (4.0 * self.batch * self.heads_q * self.head_dim * pairs, rows, cols, causal)

    # Bytes of the element-wise passes between kernels (read + written), as dist.ringattn and
    # dist.seqpar run them: an in-place merge makes two passes over the output rows (scale, then add the
    # scaled block) plus a few over the row statistics; a gradient sum reads two and writes one.

    def merge_bytes(self, rows: int) -> int:
        return self.batch * rows * self.heads_q * (5 * self.head_dim + 10) * self.acc_itemsize

    def sum_bytes(self, rows: int, heads: int) -> int:
        return 3 * self.batch * rows * heads * self.head_dim * self.acc_itemsize

    def copy_bytes(self, rows: int, heads: int) -> int:
        return 2 * self.batch * rows * heads * self.head_dim * self.itemsize


@dataclass
class Step:
    """One step of a schedule: per rank its forward-equivalent flops (x 2.5 backward), kernel calls
    (calls: (flops, rows, cols, causal) each), element-wise bytes (moved), bytes sent/received and
    messages; pairs: {(src, dst): bytes} of the point-to-point messages."""

    flops: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    recv: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    pairs: dict = field(default_factory=dict)
    overlapped: bool = True  # False: a collective that neither overlaps nor is overlapped
    collective: str = "all_to_all"  # when not overlapped: "all_to_all", or "all_gather"
    kernels: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    moved: list = field(default_factory=list)

    @classmethod
    def empty(cls, p: int) -> "Step":
        return cls([0.0] * p, [0] * p, [0] * p, [0] * p, kernels=[0] * p, calls=[[] for _ in range(p)],
                   moved=[0] * p)

    def compute(self, r: int, flops: float) -> None:
        """Rank r runs one kernel call of `flops`, shape unknown (nothing when the block is empty)."""
        if flops:
            self.flops[r] += flops
            self.kernels[r] += 1

    def kernel(self, r: int, call: tuple, factor: float = 1.0) -> None:
        """Rank r runs one kernel call (flops, rows, cols, causal: Workload.part_call), flops x factor."""
        if call[0]:
            self.compute(r, factor * call[0])
            self.calls[r].append((factor * call[0], *call[1:]))

    def move(self, r: int, nbytes: int) -> None:
        """Rank r's element-wise passes (merges, gradient sums, copies) read and write `nbytes`."""
        self.moved[r] += nbytes

    def send(self, src: int, dst: int, nbytes: int) -> None:
        if nbytes:
            self.pairs[(src, dst)] = self.pairs.get((src, dst), 0) + nbytes
            self.sent[src] += nbytes
            self.recv[dst] += nbytes
            self.messages[src] += 1


def _tokenring(w: Workload, backward: bool) -> list[Step]:
    """Steps 0..p: the diagonal's first part, p-1 remote blocks, the last returns with the diagonal's rest.
    Element-wise: forward merges each returned partial (out, lse) into the rank's own; backward sums
    dK/dV where K/V live and each returned dQ into the rank's own (the CPU path's stand-in for out
    from D, a few passes over a holder's rows, is left out: GPU kernels take D itself)."""
    p, n, hq, hkv = w.world, w.local_seq, w.heads_q, w.heads_kv
    travel = 2 * (w.q_row() + w.lse_row()) if backward else w.q_row()  # per query row: Q (and dO, lse, D)
    back = w.q_row() if backward else w.q_row() + w.lse_row()           # per row of a returned result
    factor = BWD_FLOPS if backward else 1.0
    parts = diag_parts(n, w.causal, w.diag_tail if p > 1 else 0.0)
    steps = []
    for t in range(p + 1 if p > 1 else 1):
        s = Step.empty(p)
        for r in range(p):
            a = (r + t) % p
            if t == 0:
                s.kernel(r, w.part_call(*parts[0], w.causal), factor)
                if backward:  # D = rowsum(dO * out); dK/dV of keys [0, m) start their sums
                    s.move(r, w.sum_bytes(n, hq) + 2 * w.sum_bytes(parts[0][2], hkv))
            elif t < p:
                call = w.block_call(a, r)
                s.kernel(r, call, factor)
                if backward and call[0]:  # dK/dV sums of its keys
                    s.move(r, 2 * w.sum_bytes(call[2], hkv))
            elif len(parts) > 1:
                call = w.part_call(*parts[1], w.causal)
                s.kernel(r, call, factor)
                s.move(r, (w.sum_bytes(call[1], hq) + 2 * w.sum_bytes(call[2], hkv)) if backward
                       else w.merge_bytes(call[1]))
            if t < p - 1:
                s.send(r, (r - 1) % p, (n - relay_start(a, r, p, n, w.layout, w.causal)) * travel)
            if t >= 2:  # results of step t-1 go back to their owner
                s.send(r, (r + t - 1) % p, (n - q_needed((r + t - 1) % p, r, n, w.layout, w.causal)) * back)
                rows = n - q_needed(r, (r - t + 1) % p, n, w.layout, w.causal)  # ours, folded in
                s.move(r, w.sum_bytes(rows, hq) if backward else w.merge_bytes(rows))
        steps.append(s)
    return steps


def _ring(w: Workload, backward: bool) -> list[Step]:
    """Element-wise: forward merges each block's partial result (the first covers every row and is
    taken over); backward sums each block's dQ, and dK/dV into the accumulator that arrived."""
    p, n, hq, hkv = w.world, w.local_seq, w.heads_q, w.heads_kv
    factor = BWD_FLOPS if backward else 1.0
    dkv = n * w.kv_row() // w.itemsize * w.acc_itemsize
    steps = []
    for t in range(p):
        s = Step.empty(p)
        for r in range(p):
            call = w.block_call(r, (r - t) % p)
            s.kernel(r, call, factor)
            if backward:
                s.move(r, w.sum_bytes(call[1], hq) * (t > 0) + 2 * w.sum_bytes(n, hkv) * (t > 0))
            elif t > 0:
                s.move(r, w.merge_bytes(call[1]))
            if t < p - 1:
                s.send(r, (r + 1) % p, n * w.kv_row())
            if backward and t >= 1:  # the dK/dV accumulator of the previous step
                s.send(r, (r + 1) % p, dkv)
        steps.append(s)
    if backward and p > 1:
        s = Step.empty(p)
        for r in range(p):
            s.send(r, (r + 1) % p, dkv)
        steps.append(s)
    return steps


def _collective(p: int, nbytes: float, kind: str) -> Step:
    """A blocking collective in which every rank sends and receives `nbytes`: an all-to-all posts its
    peer messages at once (one latency), an all-gather runs as a ring of p - 1 shifts."""
    s = Step.empty(p)
    s.overlapped, s.collective = False, kind
    for r in range(p):
        s.sent[r] = s.recv[r] = int(nbytes)
        s.messages[r] = p - 1 if kind == "all_gather" else 1
    return s


def _allgather(w: Workload, backward: bool) -> list[Step]:
    """Element-wise: forward merges each visible block's partial result; backward sums each block's
    dQ and dK/dV, then the P dK/dV shares that come back."""
    p, n, hq, hkv = w.world, w.local_seq, w.heads_q, w.heads_kv
    comp = Step.empty(p)
    for r in range(p):
        first = True
        for b in range(p):  # one kernel call per visible block of the gathered K/V
            call = w.block_call(r, b)
            comp.kernel(r, call, BWD_FLOPS if backward else 1.0)
            if call[0] and backward:
                comp.move(r, w.sum_bytes(call[1], hq) * (not first) + 2 * w.sum_bytes(call[2], hkv))
            elif call[0] and not first:
                comp.move(r, w.merge_bytes(call[1]))
            first = first and not call[0]
        if backward:  # dK/dV of every block [P, n, 2 hkv, d]: zeroed first, summed over P at the end
            comp.move(r, 2 * (2 * w.sum_bytes(p * n, hkv) // 3))
    if p == 1:
        return [comp]
    if not backward:
        return [_collective(p, (p - 1) * n * w.kv_row(), "all_gather"), comp]
    dkv = (p - 1) * n * w.kv_row() // w.itemsize * w.acc_itemsize  # dK/dV back by one all-to-all
    return [comp, _collective(p, dkv, "all_to_all")]


def _ulysses(w: Workload, backward: bool) -> list[Step]:
    """All-to-all (q, k, v packed in one call; backward: dO), attention on heads/p over the whole
    sequence, all-to-all back (out; backward: dq, dk, dv packed in one call). Element-wise: each
    direction packs its tensors for the all-to-all, unpacks them and reorders the rows (zigzag to
    sequence order and back), about three copies of each tensor that travels."""
    p, n = w.world, w.local_seq
    share = (p - 1) / p
    qkv, q = n * (w.q_row() + w.kv_row()) * share, n * w.q_row() * share
    comp = Step.empty(p)
    full = sum(w.block_flops(a, b) for a in range(p) for b in range(p)) / p
    whole = (full, p * n, p * n, w.causal)  # one call: the whole sequence on heads / p
    copies = 3 * (2 * w.copy_bytes(n, w.heads_q) + 2 * w.copy_bytes(n, w.heads_kv))  # q, out (dO, dq); k, v
    for r in range(p):
        comp.kernel(r, whole, BWD_FLOPS if backward else 1.0)
        if p > 1:
            comp.move(r, copies)
    if p == 1:
        return [comp]
    first, last = (q, qkv) if backward else (qkv, q)
    return [_collective(p, first, "all_to_all"), comp, _collective(p, last, "all_to_all")]


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


def predict(strategy: str, w: Workload, link: LinkProfile, compute: ComputeProfile) -> Prediction:
    """Modelled forward + backward time of one attention call on every rank."""
    fwd, bwd = schedule(strategy, w, False), schedule(strategy, w, True)
    return Prediction(strategy, replay(fwd, link, compute, False), replay(bwd, link, compute, True),
                      replay(fwd, FREE_LINK, compute, False) + replay(bwd, FREE_LINK, compute, True),
                      max(bytes_per_rank(strategy, w)))


def default_compute(device_type: str) -> ComputeProfile:
    return COMPUTE_PROFILES["h100-bf16" if device_type == "cuda" else "cpu-1-thread"]


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
