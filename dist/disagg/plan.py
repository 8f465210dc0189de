"""Placement search for serving: how many prefill and decode workers, with what parallelism (DistServe's
question, answered with our performance model).

    python -m dist.disagg.plan --model llama3-8b --prompt-len exp:1024 --output-len exp:128 \\
        --ttft 0.4 --tpot 0.05 --device h100-80g --rate 20
    python -m dist.disagg.plan --model tiny --profile benchmarks/results/serve_probe_cpu.json ...
    python -m dist.disagg.plan --probe OUT.json     # measure this machine's CPU profile (tiny model)

Candidates: a prefill instance runs on TP x SP GPUs of one node (one prompt at a time, SP as ring
attention over the prompt), a decode instance on TP GPUs (continuous batching), a colocated instance
on TP GPUs does both (Sarathi-style chunked prefill beside its decodes, `--chunk` tokens a step).

Times (PhaseTimes): on a GPU profile from the datasheet (Roofline): a step runs max(flops / (peak x
mfu), bytes / (HBM x mbu)) with weights and the KV read in its bytes, plus TP all-reduces (two per
layer) over the node's link; SP attention is dist.sim's TokenRing schedule replayed on that link;
the KV moves from prefill to decode over the link between them (the node's when both fit on one).
On CPU the same shape of formula with coefficients measured by `--probe` (Fitted).

Queueing: for each instance configuration, the highest request rate one instance serves with
>= --attain of requests inside the SLO, found by bisection over a simulated Poisson trace of the
length distributions (prefill: FCFS, an M/G/1 queue where DistServe has M/D/1; decode: continuous
batching inside the KV memory; colocated: both SLOs per request). As in DistServe, the phases are
sized apart: Poisson traffic split evenly over n instances stays Poisson, so n_p prefill and n_d
decode instances serve min(n_p g_p, n_d g_d) requests/s, and a placement's goodput per GPU is
that over its GPUs. The search evaluates each instance configuration once and then every count
within --max-gpus; the tests check it against a brute force that simulates every placement.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dist.sim import LINK_PROFILES, ComputeProfile, LinkProfile, Workload, schedule
from dist.sim.timeline import replay

# ---------------------------------------------------------------------------------------------------------------
# What is served: the model's shape, the request lengths


@dataclass(frozen=True)
class ModelShape:
    """What the time model needs of a decoder: parameters per layer, the LM head, the KV per token."""

    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layer_params: int          # weights of one layer (attention + MLP)
    vocab: int
    itemsize: int = 2          # bytes per weight and KV element

    @classmethod
    def of(cls, name: str, cfg, itemsize: int = 2) -> "ModelShape":
        """From a dist.models ModelConfig (Llama: q, k, v, o projections and a gated MLP)."""
        attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
        return cls(name, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                   attn + 3 * cfg.dim * cfg.ffn_dim, cfg.vocab_size, itemsize)

    @property
    def weight_bytes(self) -> float:
        return (self.n_layers * self.layer_params + 2 * self.vocab * self.dim) * self.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.itemsize


# Shapes that are not Llamas, for published comparisons: OPT-13B (facebook/opt-13b config.json: 40 layers,
# hidden 5120, 40 heads, ffn 20480 in two matrices, vocab 50272), the model of DistServe's placements.
OTHER_SHAPES = {"opt-13b": ModelShape("opt-13b", 40, 5120, 40, 40, 128, 4 * 5120 * 5120 + 2 * 5120 * 20480, 50272)}


def model_shape(spec: str, itemsize: int = 2) -> ModelShape:
    """A dist.models preset, a name of OTHER_SHAPES, or a folder / config.json of a Hugging Face Llama."""
    from dist.models import PRESETS

    if spec in PRESETS:
        return ModelShape.of(spec, PRESETS[spec], itemsize)
    if spec in OTHER_SHAPES:
        return OTHER_SHAPES[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model: {spec!r} is no preset ({', '.join(sorted(PRESETS) + sorted(OTHER_SHAPES))}) "
                         f"and no Hugging Face folder or config.json")
    from dist.models.hf import config_from_hf

    try:
        cfg = config_from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: {path} is not a readable Llama config.json: {e}") from None
    return ModelShape.of(path.parent.name, cfg, itemsize)


@dataclass(frozen=True)
class Lengths:
    """A token length distribution: "N" (fixed), "N1:w1,N2:w2" (a mix), "uniform:A:B" or "exp:MEAN"
    (exponential, at least 1 token), each capped at `cap` tokens."""

    spec: str
    cap: int = 1 << 20

    def __post_init__(self):
        self.sample(np.random.default_rng(0), 1)  # ValueError now rather than mid-search

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        kind, _, rest = self.spec.partition(":")
        try:
            if kind == "uniform":
                a, b = (int(x) for x in rest.split(":"))
                if not 1 <= a <= b:
                    raise ValueError
                out = rng.integers(a, b + 1, n)
            elif kind == "exp":
                mean = float(rest)
                if not mean >= 1:
                    raise ValueError
                out = np.maximum(1, np.round(rng.exponential(mean, n)))
            elif "," in self.spec or ":" in self.spec:
                pairs = [p.split(":") for p in self.spec.split(",")]
                values = np.array([int(v) for v, _ in pairs])
                weights = np.array([float(w) for _, w in pairs])
                if (values < 1).any() or (weights < 0).any() or not weights.sum() > 0:
                    raise ValueError
                out = rng.choice(values, n, p=weights / weights.sum())
            else:
                out = np.full(n, int(self.spec))
                if self.spec and int(self.spec) < 1:
                    raise ValueError
        except ValueError:
            raise ValueError(f"length {self.spec!r}: expected N, N1:w1,N2:w2, uniform:A:B or exp:MEAN "
                             f"(positive token counts)") from None
        return np.minimum(out, self.cap).astype(np.int64)


@dataclass(frozen=True)
class Trace:
    """Requests at unit rate: arrival times (scaled by 1 / rate), prompt and output lengths."""

    arrivals: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    @classmethod
    def sample(cls, prompt: Lengths, output: Lengths, n: int, seed: int = 0) -> "Trace":
        rng = np.random.default_rng(seed)
        return cls(np.cumsum(rng.exponential(1.0, n)), prompt.sample(rng, n), np.maximum(2, output.sample(rng, n)))


# ---------------------------------------------------------------------------------------------------------------
# Devices and step times


@dataclass(frozen=True)
class Device:
    """One accelerator from its datasheet; mfu / mbu: the fractions of peak flop/s and HBM bandwidth a
    large prefill / a decode step reach (assumptions stated in `source`, not fitted to a result)."""

    name: str
    flops: float               # dense bf16/fp16 peak
    hbm_Bps: float
    memory_gb: float
    intra: LinkProfile         # between GPUs of a node
    inter: LinkProfile         # between nodes
    mfu: float = 0.6
    mbu: float = 0.8
    source: str = ""


DEVICES = {
    "a100-80g": Device("a100-80g", 312e12, 2.039e12, 80, LINK_PROFILES["nvlink-a100"], LINK_PROFILES["ib-200"],
                       source="NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s bf16 dense, 2039 GB/s HBM2e; "
                              "assumed 60% of peak in prefill, 80% of HBM bandwidth in decode"),
    "h100-80g": Device("h100-80g", 989e12, 3.35e12, 80, LINK_PROFILES["nvlink-h100"], LINK_PROFILES["ib-400"],
                       source="NVIDIA H100 80GB SXM datasheet: 989 TFLOP/s bf16 dense, 3350 GB/s HBM3; "
                              "assumed 60% of peak in prefill, 80% of HBM bandwidth in decode"),
}


def allreduce_s(nbytes: float, ranks: int, link: LinkProfile) -> float:
    """A ring all-reduce of nbytes over `ranks` GPUs: 2 (ranks - 1) steps of nbytes / ranks each."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * (link.latency_s + nbytes / ranks / link.bandwidth_Bps)


class Roofline:
    """Step times of one instance (TP x SP GPUs of `device`) serving `model`, from the datasheet."""

    def __init__(self, model: ModelShape, device: Device, tp: int = 1, sp: int = 1):
        self.m, self.dev, self.tp, self.sp = model, device, tp, sp
        self.link = device.intra
        self.attn = ComputeProfile.at_efficiency(device.name, device.flops, device.mfu, device.mfu, device.source)

    def kv_capacity(self) -> float:
        """Tokens of KV the instance holds beside its weights (90% of memory usable)."""
        free = 0.9 * self.dev.memory_gb * 1e9 * self.tp * self.sp - self.m.weight_bytes
        return free / self.m.kv_bytes_per_token

    def step_s(self, tokens: int, pairs: float, batch: int, context: int) -> float:
        """One forward: `tokens` prompt tokens with `pairs` causal (query, key) pairs among them and the
        cache, plus `batch` decode tokens reading `context` cached tokens in all."""
        m, dev, gpus = self.m, self.dev, self.tp * self.sp
        rows = tokens + batch
        linear = 2.0 * m.n_layers * m.layer_params * rows + 2.0 * m.vocab * m.dim * ((tokens > 0) + batch)
        attn_flops = 4.0 * m.n_layers * m.n_heads * m.head_dim * (pairs + context)
        if self.sp > 1 and tokens:  # the prompt's attention as dist.sim's TokenRing over the SP group
            ring = m.n_layers * self.ring_s(-(-tokens // (2 * self.sp)) * 2)
            attn_flops -= 4.0 * m.n_layers * m.n_heads * m.head_dim * pairs
        else:
            ring = 0.0
        compute = (linear + attn_flops) / (gpus * dev.flops * dev.mfu)
        memory = (m.weight_bytes + context * m.kv_bytes_per_token) / (gpus * dev.hbm_Bps * dev.mbu)
        comm = 2 * m.n_layers * allreduce_s(rows / self.sp * m.dim * m.itemsize, self.tp, self.link)
        return max(compute, memory) + ring + comm

    @functools.lru_cache(maxsize=4096)
    def ring_s(self, local: int) -> float:
        """One layer's causal attention of `local` tokens a rank over the SP group (TokenRing, dist.sim)."""
        m = self.m
        w = Workload(1, local, max(1, m.n_heads // self.tp), max(1, m.n_kv_heads // self.tp), m.head_dim, self.sp,
                     itemsize=m.itemsize)
        return replay(schedule("tokenring", w, False), self.link, self.attn, False)

    def kv_s(self, prompt: int, link: LinkProfile) -> float:
        """The prompt's KV from a prefill to a decode instance: layer by layer, the whole of it counted."""
        return self.m.n_layers * link.latency_s + prompt * self.m.kv_bytes_per_token / link.bandwidth_Bps


@dataclass(frozen=True)
class Fitted:
    """Step times fitted to measurements on one device (a CPU core: `--probe`):
    prefill a + b tokens + c (2 pairs), decode a + b batch + c context, KV per message + per byte."""

    prefill: tuple[float, float, float]
    decode: tuple[float, float, float]
    kv_message_s: float
    kv_Bps: float
    kv_bytes_per_token: int
    n_layers: int
    kv_tokens: float = 1 << 40      # KV capacity (tokens)
    source: str = ""

    def kv_capacity(self) -> float:
        return self.kv_tokens

    def step_s(self, tokens: int, pairs: float, batch: int, context: int) -> float:
        t = 0.0
        if tokens:
            a, b, c = self.prefill
            t += a + b * tokens + c * 2 * pairs
        if batch:
            a, b, c = self.decode
            t += a + b * batch + c * context
        return t

    def kv_s(self, prompt: int, link=None) -> float:
        return (self.n_layers + 3) * self.kv_message_s + prompt * self.kv_bytes_per_token / self.kv_Bps


def prefill_pairs(tokens: int, offset: int = 0) -> float:
    """Causal (query, key) pairs of `tokens` new positions after `offset` cached ones."""
    return tokens * offset + tokens * (tokens + 1) / 2


# ---------------------------------------------------------------------------------------------------------------
# One instance under a Poisson trace


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    attain: float = 0.9


def simulate_prefill(times, trace: Trace, rate: float) -> np.ndarray:
    """TTFT of every request at one FCFS prefill instance (one prompt at a time)."""
    t_free, ttft = 0.0, np.empty(len(trace.prompt))
    for i, (t, n) in enumerate(zip(trace.arrivals / rate, trace.prompt)):
        t_free = max(t_free, t) + times.step_s(int(n), prefill_pairs(int(n)), 0, 0)
        ttft[i] = t_free - t
    return ttft


def simulate_decode(times, trace: Trace, rate: float, kv_s, max_batch: int) -> np.ndarray:
    """TPOT of every request at one decode instance: a request's first token is out at its arrival (the
    prefill's), its KV lands kv_s later, then it joins the running batch (when its whole KV fits) and
    leaves it the step its last token is out: continuous batching."""
    n = len(trace.prompt)
    arrive = trace.arrivals / rate
    ready = arrive + np.array([kv_s(int(p)) for p in trace.prompt])
    order = np.argsort(ready, kind="stable")
    need = trace.prompt + trace.output
    cap = times.kv_capacity()
    tpot = np.empty(n)
    left = trace.output - 1           # decode steps still to run
    ctx = trace.prompt.astype(np.int64).copy()
    running: list[int] = []
    t, nxt, used = 0.0, 0, 0
    while nxt < n or running:
        if not running and ready[order[nxt]] > t:
            t = ready[order[nxt]]
        while nxt < n and ready[order[nxt]] <= t and len(running) < max_batch:
            i = order[nxt]
            if used + need[i] > cap and running:
                break
            running.append(i)
            used += need[i]
            nxt += 1
        t += times.step_s(0, 0, len(running), int(ctx[running].sum()))
        ctx[running] += 1
        left[running] -= 1
        if left[running].min() <= 0:
            for i in running:
                if left[i] <= 0:
                    tpot[i] = (t - arrive[i]) / (trace.output[i] - 1)
                    used -= need[i]
            running = [i for i in running if left[i] > 0]
    return tpot


def simulate_colocated(times, trace: Trace, rate: float, chunk: int, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(TTFT, TPOT) of every request at one colocated instance: each step runs every decode of the batch and up
    to `chunk` prompt tokens (FCFS, a prompt may span steps), as Sarathi-Serve and serve.mode = colocated."""
    n = len(trace.prompt)
    arrive = trace.arrivals / rate
    cap = times.kv_capacity()
    ttft, tpot, t_first = np.empty(n), np.empty(n), np.empty(n)
    done_tokens = np.zeros(n, dtype=np.int64)      # prompt tokens prefilled
    left = trace.output - 1
    ctx = trace.prompt.astype(np.int64).copy()
    waiting: list[int] = []
    running: list[int] = []
    t, nxt, used = 0.0, 0, 0
    while nxt < n or waiting or running:
        if not waiting and not running and arrive[nxt] > t:
            t = arrive[nxt]
        while nxt < n and arrive[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        budget, tokens, pairs, chunks = chunk, 0, 0.0, []
        for i in waiting:
            if budget <= 0 or len(running) + len(chunks) >= max_batch:
                break
            if done_tokens[i] == 0:
                need = int(trace.prompt[i] + trace.output[i])
                if used + need > cap and (running or chunks):
                    break
                used += need
            k = min(budget, int(trace.prompt[i] - done_tokens[i]))
            chunks.append((i, k))
            tokens += k
            pairs += prefill_pairs(k, int(done_tokens[i]))
            budget -= k
        batch = list(running)
        t += times.step_s(tokens, pairs, len(batch), int(ctx[batch].sum()) if batch else 0)
        ctx[batch] += 1
        left[batch] -= 1
        for i in batch:
            if left[i] <= 0:
                tpot[i] = (t - t_first[i]) / (trace.output[i] - 1)
                used -= int(trace.prompt[i] + trace.output[i])
        running = [i for i in running if left[i] > 0]
        for i, k in chunks:
            done_tokens[i] += k
            if done_tokens[i] == trace.prompt[i]:
                waiting.remove(i)
                ttft[i] = t - arrive[i]
                t_first[i] = t
                running.append(i)
    return ttft, tpot


def max_rate(attained, capacity: float, target: float, rel: float = 0.01) -> float:
    """The highest rate r <= capacity with attained(r) >= target, by bisection (0 when none is found down to
    capacity / 1000). Rates above the instance's throughput bound are never served in steady state,
    however a finite trace looks."""
    lo, hi = capacity / 1000, capacity
    if attained(hi) >= target:
        return hi
    if attained(lo) < target:
        return 0.0
    while hi / lo > 1 + rel:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if attained(mid) >= target else (lo, mid)
    return lo


def capacity(times, inst_kind: str, trace: Trace, max_batch: int) -> float:
    """Throughput bound of one instance (requests/s) at full load: prefill one prompt after another; decode
    the largest batch the KV memory and max_batch allow."""
    prefill = float(np.mean([times.step_s(int(n), prefill_pairs(int(n)), 0, 0) for n in trace.prompt]))
    steps = float(np.mean(trace.output - 1))
    batch = max(1, min(max_batch, int(times.kv_capacity() / np.mean(trace.prompt + trace.output))))
    step = times.step_s(0, 0, batch, int(batch * np.mean(trace.prompt + trace.output / 2)))
    decode = steps * step / batch   # seconds of decode work per request
    return 1 / {"prefill": prefill, "decode": decode, "colocated": prefill + decode}[inst_kind]


# ---------------------------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class Instance:
    """One instance configuration: kind "prefill" | "decode" | "colocated", TP and SP degree."""
    kind: str
    tp: int = 1
    sp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.sp

    def __str__(self):
        return f"{self.kind} TP{self.tp}" + (f" SP{self.sp}" if self.sp > 1 else "")


@dataclass
class Placement:
    prefill: Instance | None
    n_prefill: int
    decode: Instance
    n_decode: int
    goodput: float               # requests/s within the SLO
    gpus: int = 0

    def __post_init__(self):
        self.gpus = self.n_decode * self.decode.gpus + (self.n_prefill * self.prefill.gpus if self.prefill else 0)

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.gpus

    def __str__(self):
        if self.prefill is None:
            return f"{self.n_decode} x colocated TP{self.decode.tp}"
        return f"{self.n_prefill} x {self.prefill} + {self.n_decode} x {self.decode}"


@dataclass
class Problem:
    """What the search is given; `times(instance)` builds the step-time model of an instance."""
    times: object                 # callable: Instance -> Roofline | Fitted
    trace: Trace
    slo: Slo
    kv_link: object = None        # callable: (prefill Instance, decode Instance) -> LinkProfile | None
    max_batch: int = 256
    chunk: int = 512
    rel: float = 0.01             # bisection precision
    results: dict = field(default_factory=dict)

    def attainment(self, inst: Instance, rate: float, decode_link=None) -> float:
        """Share of requests inside the SLO at `rate` requests/s on one instance (decode: its TPOT with the
        KV arriving over `decode_link`, the worst link a prefill instance could use)."""
        times = self.times(inst)
        if inst.kind == "prefill":
            return float(np.mean(simulate_prefill(times, self.trace, rate) <= self.slo.ttft_s))
        if inst.kind == "decode":
            kv = functools.lru_cache(maxsize=None)(lambda p: times.kv_s(p, decode_link))
            return float(np.mean(simulate_decode(times, self.trace, rate, kv, self.max_batch) <= self.slo.tpot_s))
        ttft, tpot = simulate_colocated(times, self.trace, rate, self.chunk, self.max_batch)
        return float(np.mean((ttft <= self.slo.ttft_s) & (tpot <= self.slo.tpot_s)))

    def goodput(self, inst: Instance, decode_link=None) -> float:
        """Highest rate one instance serves with >= slo.attain of requests inside the SLO (memoised)."""
        key = (inst, getattr(decode_link, "name", None))
        if key not in self.results:
            bound = capacity(self.times(inst), inst.kind, self.trace, self.max_batch)
            self.results[key] = max_rate(lambda r: self.attainment(inst, r, decode_link), bound, self.slo.attain,
                                         self.rel)
        return self.results[key]


def search(problem: Problem, prefills: list[Instance], decodes: list[Instance], colocated: list[Instance],
           max_gpus: int) -> list[Placement]:
    """Every placement within max_gpus, best goodput per GPU first. Each instance configuration is simulated
    once (its per-instance goodput); a placement of n_p prefill and n_d decode instances serves
    min(n_p g_p, n_d g_d)."""
    out = []
    for p in prefills:
        gp = problem.goodput(p)
        for d in decodes:
            link = problem.kv_link(p, d) if problem.kv_link else None
            gd = problem.goodput(d, link)
            for n_p in range(1, max_gpus // p.gpus + 1):
                for n_d in range(1, (max_gpus - n_p * p.gpus) // d.gpus + 1):
                    out.append(Placement(p, n_p, d, n_d, min(n_p * gp, n_d * gd)))
    for c in colocated:
        gc = problem.goodput(c)
        out += [Placement(None, 0, c, n, n * gc) for n in range(1, max_gpus // c.gpus + 1)]
    out.sort(key=lambda x: (-x.per_gpu, x.gpus, str(x)))
    return out


def cheapest_for(placements: list[Placement], rate: float) -> Placement | None:
    """The placement with the fewest GPUs whose goodput reaches `rate` (ties: the higher goodput)."""
    fits = [p for p in placements if p.goodput >= rate]
    return min(fits, key=lambda p: (p.gpus, -p.goodput)) if fits else None


def instances(gpus_per_node: int, kinds=("prefill", "decode", "colocated"), max_sp: int = 8) -> dict:
    """Candidate instance configurations: powers of two that fit a node (SP only for prefill)."""
    degrees = [d for d in (1, 2, 4, 8, 16) if d <= gpus_per_node]
    out = {"prefill": [], "decode": [], "colocated": []}
    for kind in kinds:
        for tp in degrees:
            sps = [s for s in degrees if s <= max_sp and tp * s <= gpus_per_node] if kind == "prefill" else [1]
            out[kind] += [Instance(kind, tp, s) for s in sps]
    return out


def format_table(placements: list[Placement], top: int = 15) -> str:
    lines = ["| placement | GPUs | goodput req/s | per GPU |", "|---|---|---|---|"]
    for p in placements[:top]:
        lines.append(f"| {p} | {p.gpus} | {p.goodput:.3g} | {p.per_gpu:.3g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The CPU probe: step times of the tiny model on one core, through the serving Runner


def probe(threads: int = 1, repeats: int = 5) -> Fitted:
    """Measure prefill and decode step times of the tiny model with dist.disagg.runner.Runner on this
    machine (`threads` torch threads) and fit Fitted's coefficients by least squares; the KV link is
    dist.sim's gloo-loopback profile."""
    import time

    import torch

    from dist.models import build_model

    from .kvcache import KVLayout, PagedKVCache
    from .runner import Runner

    torch.set_num_threads(threads)
    model = build_model("tiny", seed=0).eval()
    layout = KVLayout.of(model.config, 16, torch.float32)
    cache = PagedKVCache(layout, 4096, "cpu")
    runner = Runner(model, cache)

    def median(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    rows, ys = [], []
    for n in (16, 64, 256, 512, 1024, 2048):
        blocks = cache.manager.allocate(layout.blocks_for(n))
        rows.append([1.0, n, 2 * prefill_pairs(n)])
        ys.append(median(lambda: runner.prefill([7] * n, 0, blocks)))
        cache.manager.free(blocks)
    prefill = tuple(float(x) for x in np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)[0])
    rows, ys = [], []
    for batch in (1, 4, 16):
        for ctx in (64, 512, 2048):
            tables = [cache.manager.allocate(layout.blocks_for(ctx + 1)) for _ in range(batch)]
            rows.append([1.0, batch, batch * ctx])
            ys.append(median(lambda: runner.decode([7] * batch, [ctx] * batch, tables)))
            for t in tables:
                cache.manager.free(t)
    decode = tuple(float(x) for x in np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)[0])
    link = LINK_PROFILES["gloo-loopback"]
    kv_row = 2 * layout.n_layers * layout.n_kv_heads * layout.head_dim * 4
    from dist.config import ServeConfig

    serve = ServeConfig()
    return Fitted(prefill, decode, link.latency_s, link.bandwidth_Bps, kv_row, layout.n_layers,
                  kv_tokens=serve.num_blocks * serve.block_size,
                  source=f"probe: tiny model, Runner, {threads} torch thread(s), medians of {repeats}; "
                         f"KV link: dist.sim {link.name}")


def load_fitted(path) -> Fitted:
    try:
        data = json.loads(Path(path).read_text())
        return Fitted(tuple(data["prefill"]), tuple(data["decode"]), data["kv_message_s"], data["kv_Bps"],
                      data["kv_bytes_per_token"], data["n_layers"], data.get("kv_tokens", 1 << 40),
                      data.get("source", ""))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--profile: cannot read a probe profile from {path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_problem(args) -> tuple[Problem, dict]:
    """The Problem and candidate instances from parsed arguments (ValueError naming the argument)."""
    for name in ("ttft", "tpot", "rate"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be > 0, got {value}")
    if not 0 < args.attain < 1:
        raise ValueError(f"--attain must be in (0, 1), got {args.attain}")
    for name in ("gpus_per_node", "max_gpus", "requests", "chunk", "max_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    prompt = Lengths(args.prompt_len, args.max_len)
    output = Lengths(args.output_len, args.max_len)
    trace = Trace.sample(prompt, output, args.requests, args.seed)
    slo = Slo(args.ttft, args.tpot, args.attain)
    if args.profile:
        fitted = load_fitted(args.profile)
        cands = instances(1)  # one core a worker: no TP / SP
        return Problem(lambda inst: fitted, trace, slo, max_batch=args.max_batch, chunk=args.chunk), cands
    if args.device not in DEVICES:
        raise ValueError(f"--device must be one of {sorted(DEVICES)}, got {args.device!r}")
    device, model = DEVICES[args.device], model_shape(args.model)

    @functools.lru_cache(maxsize=None)
    def times(inst: Instance) -> Roofline:
        return Roofline(model, device, inst.tp, inst.sp)

    def kv_link(p: Instance, d: Instance) -> LinkProfile:
        return device.intra if p.gpus + d.gpus <= args.gpus_per_node else device.inter

    cands = instances(args.gpus_per_node)
    for kind in cands:  # an instance must hold the weights and a request's KV
        cands[kind] = [c for c in cands[kind] if times(c).kv_capacity() > int(trace.prompt.max() + trace.output.max())]
    if not cands["decode"]:
        raise ValueError(f"--model {args.model} does not fit {args.gpus_per_node} x {args.device} with its KV")
    return Problem(times, trace, slo, kv_link, args.max_batch, args.chunk), cands


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist.disagg.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b", help="preset, opt-13b, or a Hugging Face folder")
    ap.add_argument("--device", default="h100-80g", help=f"GPU profile: {', '.join(DEVICES)}")
    ap.add_argument("--profile", help="a probe profile (JSON from --probe) instead of a GPU: one core per worker")
    ap.add_argument("--prompt-len", default="exp:1024", help="N | N1:w1,N2:w2 | uniform:A:B | exp:MEAN")
    ap.add_argument("--output-len", default="exp:128")
    ap.add_argument("--max-len", type=int, default=1 << 20, help="cap on either length")
    ap.add_argument("--ttft", type=float, default=0.4, help="TTFT SLO, seconds")
    ap.add_argument("--tpot", type=float, default=0.05, help="TPOT SLO, seconds")
    ap.add_argument("--attain", type=float, default=0.9, help="share of requests inside the SLO")
    ap.add_argument("--rate", type=float, help="requests/s to serve: also print the fewest GPUs that do")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--max-gpus", type=int, default=8, help="most GPUs a placement may use")
    ap.add_argument("--requests", type=int, default=400, help="simulated requests per trace")
    ap.add_argument("--chunk", type=int, default=512, help="colocated: prompt tokens per step")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", help="write the ranked placements here")
    ap.add_argument("--probe", metavar="OUT", help="measure this machine's CPU profile into OUT and exit")
    args = ap.parse_args(argv)
    try:
        if args.probe:
            fitted = probe()
            Path(args.probe).write_text(json.dumps(asdict(fitted), indent=1) + "\n")
            print(json.dumps(asdict(fitted), indent=1))
            return 0
        problem, cands = build_problem(args)
        ranked = search(problem, cands["prefill"], cands["decode"], cands["colocated"], args.max_gpus)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ranked or ranked[0].goodput <= 0:
        print("no placement meets the SLO at any rate: loosen --ttft / --tpot or add GPUs")
        return 1
    what = args.profile or f"{args.model} on {args.device}"
    print(f"{what}: prompts {args.prompt_len}, outputs {args.output_len}; SLO TTFT {args.ttft * 1e3:g} ms, "
          f"TPOT {args.tpot * 1e3:g} ms at {args.attain:.0%}")
    print("per-instance goodput (req/s): " + ", ".join(
        f"{inst}{f' (KV over {link})' if link else ''}: {g:.3g}"
        for (inst, link), g in sorted(problem.results.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))))
    print(format_table(ranked, args.top))
    best = ranked[0]
    print(f"best: {best}: {best.per_gpu:.3g} requests/s per GPU ({best.goodput:.3g} on {best.gpus} GPUs)")
    if args.rate:
        pick = cheapest_for(ranked, args.rate)
        print(f"for {args.rate:g} requests/s: " + (f"{pick} ({pick.gpus} GPUs, goodput {pick.goodput:.3g})" if pick
                                                  else f"no placement within --max-gpus {args.max_gpus}"))
    if args.json:
        Path(args.json).write_text(json.dumps([{"placement": str(p), "gpus": p.gpus, "goodput": p.goodput,
                                                "per_gpu": p.per_gpu} for p in ranked], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
