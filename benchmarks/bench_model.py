"""Validation of the performance model (dist.sim), out of sample.

1. Device probe, once per P, on P ranks at once (every rank of a torchrun job): attention forward
   and backward of blocks of several sizes, causal and not, and the element-wise passes between
   kernels (an in-place merge, a gradient sum, a copy), the slowest rank's time per call; a
   least-squares fit of `call_s + flops / rate` over the flops the kernel computes (whole tiles of
   causal blocks) and the median element-wise rate give a measured ComputeProfile
   (`time_kernels`, `fit_compute`): what a rank gets while every rank computes.
2. Link probe, once, over a 2-rank group: 64-byte exchange (latency), one-way send, both ways at
   once (duplex), all-to-all and all-gather (their rates), with messages unlike any strategy's.
3. Predictions for configurations neither step used (every strategy, P = 2..4, several sequence
   lengths), written down before the runs; then each configuration runs (forward + backward, the
   slowest rank's time, median of --repeats) and the error per point is reported with the median
   and worst |error| per link type, per P and per strategy. No refitting per point.

Ranks that outnumber the machine's cores (the CPU testbed's P = 3, 4 on 2 cores) are probed as
they run, P at once, so the profile is the capacity they get, measured, not a rule; what else
sharing cores costs (the network stack's CPU time beside compute) is left in the error.

    python benchmarks/bench_model.py                      # loopback, spawns P = 2, 3, 4
    python benchmarks/bench_model.py --quick              # smoke test
    torchrun --nproc-per-node P benchmarks/bench_model.py --link-profile FILE   # an existing job

Writes benchmarks/results/bench_model.json and a dated markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, free_port, machine, now, results_at, write_results  # noqa: E402
from dist import comm  # noqa: E402
from dist.kernels import attention_backward, attention_forward, merge_attention  # noqa: E402
from dist.plan import SP_STRATEGIES, diag_tail  # noqa: E402
from dist.ringattn import shard  # noqa: E402
from dist.seqpar import sp_attention  # noqa: E402
from dist.sim import KERNEL_TILES, ComputeProfile, LinkProfile, Workload, load_link_profiles, predict  # noqa: E402

SUMMARY_KEYS = ("link", "world", "strategy")  # the error summarised per link type, per P, per strategy


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,3,4", help="comma list of P (spawned on this host)")
    ap.add_argument("--seq-lens", default="1536,2304,3072", help="global sequence lengths (divisible by 2P)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--strategies", default=",".join(SP_STRATEGIES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--probe-bytes", type=int, default=8 << 20, help="message size of the link probe")
    ap.add_argument("--link-profile", help="JSON link profiles (dist.sim format): use the first instead of probing")
    ap.add_argument("--label", default="", help="recorded with the results (e.g. the testbed setting)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "bench_model.json"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat, nothing written")
    args = ap.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.quick:
        args.seq_lens, args.heads, args.kv_heads, args.head_dim = "96", 4, 4, 16
        args.repeats, args.warmup, args.probe_bytes = 1, 0, 1 << 16
    unknown = set(args.strategies.split(",")) - set(SP_STRATEGIES)
    if unknown:
        ap.error(f"--strategies: unknown {', '.join(sorted(unknown))}; known: {', '.join(SP_STRATEGIES)}")
    return args


def _per_call(fn, repeats: int) -> float:
    """Seconds per call over `repeats` calls after a warm-up (every probing rank runs them at once)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _fit(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of t = call_s + flops / rate over (flops, t) samples, each weighted by 1 / t^2
    (relative errors, so small blocks pin call_s and large ones the rate) -> (rate, call_s >= 0)."""
    w = [1.0 / t ** 2 for _, t in samples]
    sw, swf = sum(w), sum(wi * f for wi, (f, _) in zip(w, samples))
    swff = sum(wi * f * f for wi, (f, _) in zip(w, samples))
    swt, swft = sum(wi * t for wi, (_, t) in zip(w, samples)), sum(wi * f * t for wi, (f, t) in zip(w, samples))
    det = sw * swff - swf * swf
    call_s, slope = (swt * swff - swf * swft) / det, (sw * swft - swf * swt) / det
    if call_s < 0 or slope <= 0:  # a negative fixed cost (or rate) is noise: fit through zero
        call_s, slope = 0.0, swft / swff
    return 1.0 / slope, call_s


def _together() -> None:
    """Start the next timing with every probing rank (so all of them compute at once)."""
    if dist.is_initialized():
        dist.barrier()


def time_kernels(args, sizes=(16, 64, 256, 512, 1024, 2048)) -> list[dict]:
    """This rank's timings of attention blocks (rows x rows, causal and not, forward and backward)
    and of the element-wise passes between them (an in-place merge of partial outputs, a gradient
    sum, a copy), one thread. Every rank of the job probes at once, each timing starting together:
    what a rank (a device, or a share of the cores) gets while every rank computes."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    reps = max(1, args.repeats)
    out = []
    for n in (16, 64) if args.quick else sizes:
        q = torch.randn(1, n, args.heads, args.head_dim, generator=g)
        k, v = (torch.randn(1, n, args.kv_heads, args.head_dim, generator=g) for _ in range(2))
        w = Workload(1, n, args.heads, args.kv_heads, args.head_dim, 1, True, "contiguous", 4)
        for causal in (False, True):
            o, lse = attention_forward(q, k, v, causal=causal)
            _together()
            fwd = _per_call(lambda: attention_forward(q, k, v, causal=causal), reps)
            _together()
            bwd = _per_call(lambda: attention_backward(o, q, k, v, o, lse, causal=causal), reps)
            out.append(dict(kind="kernel", rows=n, causal=causal, flops=w.part_flops(0, 0, n, causal),
                            fwd_s=fwd, bwd_s=bwd))
        o, lse = attention_forward(q, k, v, causal=False)
        b_o, b_lse = o.clone(), lse.clone()
        for kind, fn, nbytes in (
                ("merge", lambda: merge_attention(o, lse, b_o, b_lse, inplace=True), w.merge_bytes(n)),
                ("sum", lambda: o.add_(b_o), w.sum_bytes(n, args.heads)),
                ("copy", lambda: q.transpose(1, 2).contiguous(), w.copy_bytes(n, args.heads))):
            _together()
            out.append(dict(kind=kind, rows=n, bytes=nbytes, s=_per_call(fn, reps)))
    return out


def fit_compute(per_rank: list[list[dict]], args, device_type: str = "cpu") -> ComputeProfile:
    """A measured ComputeProfile from every probing rank's `time_kernels` (the slowest rank per sample):
    kernel rates and call_s by `_fit` over the flops the kernel computes (whole tiles of causal
    blocks, the device's KERNEL_TILES), mem_Bps the median rate of the element-wise passes."""
    tile_q, tile_k = KERNEL_TILES[device_type]
    tiles = ComputeProfile("tiles", 1.0, 1.0, tile_q=tile_q, tile_k=tile_k)
    rows = [dict(r, **{key: max(rank[i][key] for rank in per_rank)
                       for key in ("fwd_s", "bwd_s", "s") if key in r})
            for i, r in enumerate(per_rank[0])]
    kernels = [r for r in rows if r["kind"] == "kernel"]
    work = [tiles.kernel_flops(r["flops"], r["rows"], r["rows"], r["causal"]) for r in kernels]
    (fwd_rate, fwd_call), (bwd_rate, bwd_call) = (
        _fit([(f * factor, r[key]) for f, r in zip(work, kernels)]) for key, factor in (("fwd_s", 1.0), ("bwd_s", 2.5)))
    mem_Bps = statistics.median(r["bytes"] / r["s"] for r in rows if r["kind"] != "kernel")
    return ComputeProfile(
        "measured-kernels", fwd_rate, bwd_rate,
        f"probed: {len(kernels)} block timings each way and {len(rows) - len(kernels)} element-wise passes, one "
        f"thread, {len(per_rank)} rank(s) at once; tiles {tile_q} x {tile_k}",
        call_s=(fwd_call + bwd_call) / 2, basis="measured", tile_q=tile_q, tile_k=tile_k, mem_Bps=mem_Bps), rows


def probe_link(nbytes: int, repeats: int, name: str) -> LinkProfile:
    """Every rank of the job calls it; ranks 0 and 1 carry the point-to-point patterns, every rank the
    collectives. Times: the slowest rank's, median over repeats."""
    rank, world = dist.get_rank(), dist.get_world_size()
    peer = 1 - rank if rank < 2 else None
    big, small = torch.zeros(nbytes // 4), torch.zeros(16)

    def p2p(buf, both):
        ex = comm.Exchange()
        if peer is not None:
            if rank == 0 or both:
                ex.send(buf, peer, "probe")
            if rank == 1 or both:
                ex.recv(torch.empty_like(buf), peer)
        ex.start()
        ex.wait()

    chunk = torch.zeros(world, nbytes // 4 // world)  # [P, ...]: slice i goes to rank i
    patterns = {"latency": lambda: p2p(small, True), "send": lambda: p2p(big, False),
                "exchange": lambda: p2p(big, True), "alltoall": lambda: comm.all_to_all(chunk, None, "probe"),
                "allgather": lambda: comm.all_gather(big, None, "probe")}
    t = {}
    for key, fn in patterns.items():
        fn()
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times.append(dt.item())
        t[key] = statistics.median(times)
    comm.counters.reset()
    lat = t["latency"]
    bw = nbytes / max(t["send"] - lat, 1e-9)
    both = nbytes / max(t["exchange"] - lat, 1e-9)
    a2a = chunk.numel() * 4 * (world - 1) / world / max(t["alltoall"] - lat, 1e-9)
    ag = nbytes * (world - 1) / max(t["allgather"] - (world - 1) * lat, 1e-9)
    return LinkProfile(name, bw, lat, min(1.0, both / bw), a2a, f"probed by bench_model: {world} ranks, "
                       f"{nbytes} B messages", allgather_Bps=ag)


def run_configs(args, world: int) -> list[dict]:
    """Every rank runs every (seq_len, strategy) of this P; rank 0 returns the measured rows."""
    rank = dist.get_rank()
    torch.set_num_threads(1)
    out = []
    for seq in (int(s) for s in args.seq_lens.split(",")):
        if seq % (2 * world):
            raise ValueError(f"--seq-lens: {seq} is not divisible by 2 * P = {2 * world}")
        g = torch.Generator().manual_seed(seq)
        full = [torch.randn(1, seq, h, args.head_dim, generator=g) for h in
                (args.heads, args.kv_heads, args.kv_heads, args.heads)]
        mine = [shard(x, 1, rank, world, "zigzag") for x in full]
        steps = {}
        for strategy in args.strategies.split(","):
            if strategy == "ulysses" and args.heads % world:
                continue

            def step(strategy=strategy):
                q, k, v = (x.clone().requires_grad_() for x in mine[:3])
                sp_attention(q, k, v, causal=True, strategy=strategy, layout="zigzag").backward(mine[3])

            steps[strategy] = step
        times = {name: [] for name in steps}
        for i in range(args.warmup + args.repeats):  # interleaved rounds: load changes hit all alike
            for name, fn in steps.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if i >= args.warmup:
                    times[name].append(dt.item())
        for name, ts in times.items():
            med = statistics.median(ts)
            out.append(dict(world=world, seq_len=seq, strategy=name, measured_s=med, min_s=min(ts),
                            spread=(max(ts) - min(ts)) / med))
    return out


def _probe(args, world) -> LinkProfile:
    return probe_link(args.probe_bytes, max(3, 2 * args.repeats), "gloo-loopback-probed")


def _probe_kernels(args, world) -> list[list[dict]]:
    """time_kernels on every rank of the job at once; every rank's timings (on rank 0)."""
    mine = time_kernels(args)
    every = [None] * world
    dist.all_gather_object(every, mine)
    return every


def _worker(rank, world, port, task, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        res = task(args, world)
        if rank == 0:
            torch.save(res, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(task, args, world):
    """task(args, world) on `world` fresh gloo ranks of this host; rank 0's result."""
    import tempfile

    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        try:
            mp.spawn(_worker, args=(world, port, task, args, out), nprocs=world)
        except mp.ProcessExitedException as e:  # a rank that aborts at exit (issue 15): keep what rank 0 saved
            if not os.path.exists(out):
                raise
            print(f"warning: {e}; rank 0 had saved its results", flush=True)
        return torch.load(out, weights_only=False)


def predict_rows(args, rows: list[dict], link: LinkProfile, computes: dict) -> list[dict]:
    """Each measured row with the model's prediction (error = predicted / measured - 1); computes:
    {P: the ComputeProfile probed with P ranks at once}."""
    for r in rows:
        p = r["world"]
        w = Workload(1, r["seq_len"] // p, args.heads, args.kv_heads, args.head_dim, p, True, "zigzag", 4,
                     diag_tail=diag_tail("cpu"))
        pred = predict(r["strategy"], w, link, computes[p])
        r.update(predicted_s=pred.total_s, predicted_compute_s=pred.compute_s, link=link.name,
                 error=pred.total_s / r["measured_s"] - 1.0, error_vs_min=pred.total_s / r["min_s"] - 1.0)
    return rows


def summary(rows: list[dict], key: str, error: str = "error") -> list[dict]:
    """Median and worst |error| of the rows grouped by `key` (error: the row field compared)."""
    out = []
    for value in sorted({r[key] for r in rows}, key=str):
        errs = [r[error] for r in rows if r[key] == value]
        worst = max(errs, key=abs)
        out.append({key: value, "points": len(errs), "median_abs_error": statistics.median(abs(e) for e in errs),
                    "worst_error": worst, "within_10pct": sum(abs(e) <= 0.10 for e in errs)})
    return out


def report(args, doc: dict) -> str:
    link = doc["link"]
    lines = [f"# dist.sim out of sample, {doc['date'][:10]}", "",
             f"Machine: {doc['machine']}. {args.label}".rstrip(), "",
             f"Causal zigzag attention fwd+bwd, batch 1, heads {args.heads}/{args.kv_heads}, d={args.head_dim}, "
             f"fp32, one thread per rank, {args.repeats} repeats after {args.warmup} warm-up; the slowest rank's "
             f"time. Link: {link['name']}, {link['bandwidth_Bps'] / 1e9:.2f} GB/s, "
             f"{link['latency_s'] * 1e6:.0f} us, duplex {link['duplex']:.2f}, all-to-all "
             f"{(link['alltoall_Bps'] or 0) / 1e9:.2f} GB/s, all-gather "
             f"{(link['allgather_Bps'] or 0) / 1e9:.2f} GB/s ({link['source']}).", "",
             "Compute, probed with P ranks at once (the slowest rank's time per call; rates on the tiles the "
             "kernel computes):", "",
             "| P | fwd GFLOP/s | bwd GFLOP/s | us a call | element-wise GB/s | source |", "|---|---|---|---|---|---|"]
    for p, c in doc["compute"].items():
        lines.append(f"| {p} | {c['fwd_flops'] / 1e9:.1f} | {c['bwd_flops'] / 1e9:.1f} | {c['call_s'] * 1e6:.0f} | "
                     f"{c['mem_Bps'] / 1e9:.1f} | {c['source']} |")
    p, c = next(iter(doc["compute"].items()))
    lines += ["", f"Kernel probe at P = {p}: causal / full is the measured time of a causal block over the full "
              "one, against the tiled count the model charges.", "",
              "| rows | full fwd ms | full bwd ms | causal/full fwd | causal/full bwd | tiled model |",
              "|---|---|---|---|---|---|"]
    tiles = ComputeProfile("tiles", 1.0, 1.0, tile_q=c["tile_q"], tile_k=c["tile_k"])
    kernels = {(r["rows"], r["causal"]): r for r in doc["kernel_timings"][p] if r["kind"] == "kernel"}
    for n in sorted({n for n, _ in kernels}):
        full, causal = kernels[(n, False)], kernels[(n, True)]
        model = tiles.kernel_flops(causal["flops"], n, n, True) / full["flops"]
        lines.append(f"| {n} | {1e3 * full['fwd_s']:.2f} | {1e3 * full['bwd_s']:.2f} | "
                     f"{causal['fwd_s'] / full['fwd_s']:.2f} | {causal['bwd_s'] / full['bwd_s']:.2f} | {model:.2f} |")
    lines += ["", "error = predicted / median - 1; error vs best = predicted / fastest repeat - 1 (the run least "
              "disturbed by other work on the machine).", "",
              "load: the machine's 1-minute load average when that P's runs ended (all jobs on it, "
              "not only this benchmark's ranks).", "",
              "| P | seq | strategy | median s | spread | best s | predicted s | error | error vs best | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        load = f"{r['load']:.1f}" if "load" in r else "-"
        lines.append(f"| {r['world']} | {r['seq_len']} | {r['strategy']} | {r['measured_s']:.3f} | "
                     f"{100 * r['spread']:.0f}% | {r['min_s']:.3f} | {r['predicted_s']:.3f} | "
                     f"{100 * r['error']:+.1f}% | {100 * r['error_vs_min']:+.1f}% | {load} |")
    for name, errors in doc["summary"].items():
        for key in SUMMARY_KEYS:
            lines += ["", f"| {key} | points | median abs {name} | worst {name} | within 10% |",
                      "|---|---|---|---|---|"]
            for s in errors[key]:
                lines.append(f"| {s[key]} | {s['points']} | {100 * s['median_abs_error']:.1f}% | "
                             f"{100 * s['worst_error']:+.1f}% | {s['within_10pct']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    loaded = next(iter(load_link_profiles(args.link_profile).values())) if args.link_profile else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this job's ranks
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        try:
            rank = dist.get_rank()
            world = dist.get_world_size()
            computes, kernel_rows = {}, {}
            computes[world], kernel_rows[world] = fit_compute(_probe_kernels(args, world), args)  # every rank at once
            link = loaded or _probe(args, dist.get_world_size())
            rows = run_configs(args, dist.get_world_size())
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return None
    else:
        link = loaded or _spawn(_probe, args, 2)
        rows, computes, kernel_rows = [], {}, {}
        for world in (int(x) for x in args.worlds.split(",")):
            computes[world], kernel_rows[world] = fit_compute(_spawn(_probe_kernels, args, world), args)  # P at once
            rows += [dict(r, load=os.getloadavg()[0]) for r in _spawn(run_configs, args, world)]
            print(f"P={world}: {len(rows)} points measured", flush=True)
    print(f"compute: {computes}\nlink: {link}", flush=True)
    predict_rows(args, rows, link, computes)
    doc = dict(benchmark="bench_model", date=now(), machine=machine(load_start),
               label=args.label, args={k: v for k, v in vars(args).items() if k != "json"},
               compute={p: asdict(c) for p, c in computes.items()}, kernel_timings=kernel_rows, link=asdict(link), rows=rows,
               summary={name: {key: summary(rows, key, field) for key in SUMMARY_KEYS}
                        for name, field in (("error", "error"), ("error vs best", "error_vs_min"))})
    md = report(args, doc)
    print(md)
    if not args.quick:
        out_dir, name = results_at(args.json)
        json_path, md_path = write_results(name, doc, md, out_dir, md_name=f"{name}-{doc['date'][:10]}.md")
        print(f"wrote {json_path} and {md_path}")
    return doc


if __name__ == "__main__":
    main()
