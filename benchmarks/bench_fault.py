"""Fault tolerance: what in-memory snapshots cost, how fast the codes run, how fast recovery is, what survives.

    python benchmarks/bench_fault.py                 # all parts below; writes results/bench_fault.json + .md
    python benchmarks/bench_fault.py --parts codec,survival

Parts:
- step: a 112M-parameter Llama (vocab 32000, dim 768, 10 layers) on 2 CPU ranks (torchrun, gloo, torch
  AdamW engine), steps interleaved round by round in one run: snapshots off; snapshots every step
  (dist.fault); torch.distributed.checkpoint.async_save every step (the peer; each save waits for the
  previous one, as its docs recommend). Median step time and spread per mode; overhead ratios vs off.
- codec: encode and rebuild GB/s of each code (dist.fault.codec) over a group of 4 x 64 MiB blobs,
  rebuilding as many members as the code survives. Data bytes per second.
- recovery: a 2-rank torchrun job of the tiny config, rank 1 SIGKILLed after step 4: seconds from the kill
  to the restarted workers' restore (torchrun restart + imports + rendezvous + model build), then the
  restore's phases (scan of host memory with checksums, manifest all-gather, rebuild, load).
- survival: probability that every snapshot survives k random host failures out of N = 16, for each
  scheme (exact, over every set of k hosts).
On CPU only the ratios mean anything; absolute times count only from a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BIG = dict(vocab_size=32000, dim=768, n_layers=10, n_heads=12, n_kv_heads=4, ffn_dim=2048)


# ---------------------------------------------------------------- step time (a torchrun worker)

def step_worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F

    from dist.config import load_config
    from dist.engine import TorchEngine
    from dist.fault.snapshot import Snapshots
    from dist.models import build_model
    from dist.models.llama import ModelConfig
    from dist.runtime import Runtime

    cfg = load_config(None, ["fault.snapshot_every=1", "fault.parity=none", "runtime.threads=1"])
    rt = Runtime.start(cfg)
    model = build_model(ModelConfig(**BIG), seed=0)
    engine = TorchEngine(cfg, model, rt)
    snaps = Snapshots(cfg, rt, model, engine)
    g = torch.Generator().manual_seed(rt.rank)
    ids = torch.randint(0, BIG["vocab_size"], (1, args.seq + 1), generator=g)
    ckdir = os.path.join(args.workdir, "dcp")
    pending = None
    times = {m: [] for m in args.modes}
    step = 0
    for rnd in range(args.rounds + 1):  # round 0 is warm-up
        for mode in args.modes:
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                logits = engine.forward(input_ids=ids[:, :-1])
                F.cross_entropy(logits[0], ids[0, 1:]).backward()
                if mode == "snapshot":
                    snaps.wait_copied()
                engine.step(1e-4)
                step += 1
                if mode == "snapshot":
                    snaps.after_step(step)
                elif mode == "dcp":
                    if pending is not None:
                        pending.result()
                    pending = dcp.async_save({"model": model.state_dict(), "optim": engine.optimizer.state_dict()},
                                             checkpoint_id=ckdir)
                dt = time.perf_counter() - t0
                if rnd:
                    times[mode].append(dt)
            snaps.join()
            if pending is not None:
                pending.result()
                pending = None
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, times)
    if rt.rank == 0:
        merged = {m: [max(t[m][i] for t in gathered) for i in range(len(times[m]))] for m in args.modes}
        with open(args.out_json, "w") as f:
            json.dump({"times": merged, "params": sum(p.numel() for p in model.parameters())}, f)
    rt.close()


def run_step(args) -> dict:
    out = os.path.join(args.workdir, "step.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", "step", "--seq", str(args.seq), "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--workdir", args.workdir, "--out-json", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    with open(out) as f:
        data = json.load(f)
    med = {m: statistics.median(t) for m, t in data["times"].items()}
    rows = {m: {"median_s": med[m], "min_s": min(t), "max_s": max(t), "n": len(t),
                "overhead_vs_off": med[m] / med["off"] - 1} for m, t in data["times"].items()}
    ratio = rows["snapshot"]["overhead_vs_off"] / rows["dcp"]["overhead_vs_off"] \
        if rows["dcp"]["overhead_vs_off"] > 0 else None
    return {"params": data["params"], "seq_per_rank": args.seq, "modes": rows, "snapshot_over_dcp_overhead": ratio}


# ---------------------------------------------------------------- codecs

def run_codec(args) -> list[dict]:
    import numpy as np

    from dist.fault.codec import encode_group, make_code, rebuild_group

    n, G = args.codec_mb << 20, 4
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(G)]
    rows = []
    for name in ("xor", "rs2"):
        code = make_code(name, G)
        enc, dec = [], []
        for i in range(args.codec_repeats + 1):
            t0 = time.perf_counter()
            parity = encode_group(blobs, code)
            t1 = time.perf_counter()
            lost = list(range(code.m))
            out = rebuild_group([None if h in lost else b for h, b in enumerate(blobs)],
                                [None if h in lost else p for h, p in enumerate(parity)], [n] * G, code)
            t2 = time.perf_counter()
            assert all(out[h].tobytes() == blobs[h].tobytes() for h in lost)
            if i:
                enc.append(G * n / (t1 - t0) / 1e9)
                dec.append(code.m * n / (t2 - t1) / 1e9)
        rows.append({"code": name, "group": G, "blob_mb": args.codec_mb, "lost": code.m,
                     "encode_GBps": statistics.median(enc), "encode_min": min(enc), "encode_max": max(enc),
                     "rebuild_GBps": statistics.median(dec), "rebuild_min": min(dec), "rebuild_max": max(dec)})
    return rows


# ---------------------------------------------------------------- recovery

def run_recovery(args) -> list[dict]:
    rows = []
    for trial in range(args.recovery_trials):
        tmp = tempfile.mkdtemp(prefix="bench-fault-")
        sets = ["train.steps=8", "fault.snapshot_every=1", "fault.kill_step=4", "fault.kill_rank=1",
                "log.level=info", f"log.dir={tmp}/log"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "dist.launch", "train",
               *[a for s in sets for a in ("--set", s)]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        kill = float(re.search(r"fault injection: SIGKILL .* t=([\d.]+)", r.stderr).group(1))
        m = re.search(r"restored snapshot (\d+) \(step (\d+)\).*\| (.*) t=([\d.]+)", r.stderr)
        phases = {k: float(v) for k, v in (x.split("=") for x in m.group(3).split())}
        done = float(m.group(4))
        restore = sum(phases.values())
        rows.append({"trial": trial, "restored_step": int(m.group(2)), "total_s": done - kill,
                     "restart_rendezvous_build_s": done - kill - restore, **phases})
    return rows


# ---------------------------------------------------------------- survival

def survival(n_hosts: int, group: int, m: int, k: int) -> float:
    """P(no parity group of `group` hosts loses more than m) for k hosts failed uniformly at random."""
    ok = total = 0
    for failed in itertools.combinations(range(n_hosts), k):
        total += 1
        per = [0] * (n_hosts // group)
        for h in failed:
            per[h // group] += 1
        ok += max(per, default=0) <= m
    return ok / total


def run_survival(args) -> list[dict]:
    schemes = [("none", 4, 0), ("xor", 4, 1), ("rs2", 4, 2), ("xor", 2, 1), ("rs2", 8, 2)]
    return [{"scheme": f"{name} (group {g})", "hosts": 16, "k": k, "p_survive": survival(16, g, m, k)}
            for name, g, m in schemes for k in range(0, 5)]


# ---------------------------------------------------------------- report

def markdown(res: dict) -> str:
    lines = [f"# bench_fault {res['date']}", "", f"Machine: {res['machine']}", ""]
    if "step" in res:
        s = res["step"]
        lines += [f"## Step time, {s['params'] / 1e6:.0f}M parameters, 2 CPU ranks, {s['seq_per_rank']} tokens/rank",
                  "", "| mode | median s | min | max | n | overhead vs off |", "|---|---|---|---|---|---|"]
        for mode, r in s["modes"].items():
            lines.append(f"| {mode} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['n']} | "
                         f"{100 * r['overhead_vs_off']:+.1f}% |")
        ratio = s["snapshot_over_dcp_overhead"]
        lines += ["", f"Snapshot overhead / DCP async_save overhead: {ratio:.3f}" if ratio is not None
                  else "DCP async_save showed no overhead in this run", ""]
    if "codec" in res:
        lines += ["## Codes (group of 4, data bytes per second)", "",
                  "| code | encode GB/s (min-max) | rebuild GB/s (min-max) | members rebuilt |", "|---|---|---|---|"]
        for r in res["codec"]:
            lines.append(f"| {r['code']} | {r['encode_GBps']:.2f} ({r['encode_min']:.2f}-{r['encode_max']:.2f}) | "
                         f"{r['rebuild_GBps']:.2f} ({r['rebuild_min']:.2f}-{r['rebuild_max']:.2f}) | {r['lost']} |")
        lines.append("")
    if "recovery" in res:
        lines += ["## Recovery after SIGKILL of rank 1 (tiny config, 2 ranks)", "",
                  "| trial | total s | restart+rendezvous+build s | scan s | manifests s | rebuild s | load s |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["recovery"]:
            lines.append(f"| {r['trial']} | {r['total_s']:.2f} | {r['restart_rendezvous_build_s']:.2f} | "
                         f"{r.get('scan_s', 0):.3f} | {r.get('manifests_s', 0):.3f} | {r.get('rebuild_s', 0):.3f} | "
                         f"{r.get('load_s', 0):.3f} |")
        lines.append("")
    if "survival" in res:
        ks = sorted({r["k"] for r in res["survival"]})
        lines += ["## Survival of k random host failures out of 16", "",
                  "| scheme | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for scheme in dict.fromkeys(r["scheme"] for r in res["survival"]):
            ps = {r["k"]: r["p_survive"] for r in res["survival"] if r["scheme"] == scheme}
            lines.append(f"| {scheme} | " + " | ".join(f"{ps[k]:.3f}" for k in ks) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="step,codec,recovery,survival")
    p.add_argument("--seq", type=int, default=256, help="tokens per rank per step (step part)")
    p.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--codec-mb", type=int, default=64)
    p.add_argument("--codec-repeats", type=int, default=5)
    p.add_argument("--recovery-trials", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    p.add_argument("--modes", default="off,snapshot,dcp", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.modes = args.modes.split(",")
    if args.worker == "step":
        return step_worker(args)
    parts = args.parts.split(",")
    res = {"date": datetime.date.today().isoformat(),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"load average {os.getloadavg()[0]:.1f} at start (shared machine)"}
    with tempfile.TemporaryDirectory(prefix="bench-fault-") as work:
        args.workdir = work
        for part in parts:
            t0 = time.perf_counter()
            res[part] = {"step": run_step, "codec": run_codec, "recovery": run_recovery,
                         "survival": run_survival}[part](args)
            print(f"{part}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_fault.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(args.out, f"bench_fault_{res['date']}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
