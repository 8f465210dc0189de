"""Fault tolerance: what in-memory snapshots cost, how fast the codes run, how fast recovery is, what survives.

    python benchmarks/bench_fault.py                 # all parts below; writes results/bench_fault.json + .md
    python benchmarks/bench_fault.py --parts codec,survival

Parts:
- step: a 112M-parameter Llama (vocab 32000, dim 768, 10 layers) on 2 CPU ranks (torchrun, gloo, torch
  AdamW engine), steps interleaved round by round in one run: snapshots off; a plain background copy of
  the same bytes each step (the control: what any copy to host memory costs the step on this machine);
  snapshots every step (dist.fault); torch.distributed.checkpoint.async_save every step (the peer; each
  save waits for the previous one, as its docs recommend). Median step time and spread per mode; overhead
  ratios vs off; the CPU seconds the snapshot thread uses per snapshot. 256 tokens per rank.
- steplong: the same at --seq-long (1024) tokens per rank: a snapshot costs the same, the step is longer.
- codec: encode and rebuild GB/s of each code (dist.fault.codec) over a group of 4 x 64 MiB blobs,
  rebuilding as many members as the code survives. Data bytes per second.
- recovery: a 2-rank torchrun job of the tiny config, rank 1 SIGKILLed after step 4: seconds from the kill
  to the restored state, by phase: restart (torchrun), imports, rendezvous, build, then the restore's scan,
  manifests, fetch, decode, load.
- trials: --kill-trials torchrun jobs, a random rank SIGKILLed at a random step (after the step or mid-copy),
  final parameters and AdamW state compared bit for bit with an uninterrupted run.
- model8b: dist.fault.cost's modelled overhead of every-step snapshots for launch/llama3-8b-128k.toml on
  H100s, every bandwidth stated.
- survival: probability that every snapshot survives k random host failures out of N = 16, for each
  scheme (exact, over every set of k hosts).
On CPU only the ratios mean anything; absolute times count only from a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, machine, today, write_results  # noqa: E402

BIG = dict(vocab_size=32000, dim=768, n_layers=10, n_heads=12, n_kv_heads=4, ffn_dim=2048)


# ---------------------------------------------------------------- step time (a torchrun worker)

def step_worker(args) -> None:
    import threading

    import numpy as np
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
    # async_save's background thread runs collectives: on the training group they could interleave with the
    # step's all-reduce and deadlock, so it gets a gloo group of its own (as torch's async recipe does)
    dcp_pg = dist.new_group(backend="gloo")
    pending = copier = None
    # the "copy" control: the bytes a snapshot copies (this rank's 1/world slice of the replicated model and
    # AdamW state) copied by a plain low-priority thread, nothing else: what any copy to host memory costs here
    sink = []

    def copy_slice():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # as the snapshot thread
        live = list(model.parameters()) + [v for st in engine.optimizer.state.values() for v in st.values()
                                           if torch.is_tensor(v) and v.dim()]
        flat = [t.detach().reshape(-1).view(torch.uint8).numpy() for t in live]
        total = sum(len(a) for a in flat)
        lo, hi = rt.rank * total // rt.world_size, (rt.rank + 1) * total // rt.world_size
        if not sink:
            sink.append(np.empty(hi - lo, dtype=np.uint8))
        off = 0
        for a in flat:
            a0, a1 = max(lo, off), min(hi, off + len(a))
            if a0 < a1:
                np.copyto(sink[0][a0 - lo:a1 - lo], a[a0 - off:a1 - off])
            off += len(a)

    times = {m: [] for m in args.modes}
    step, cpu0, snaps0 = 0, 0.0, 0
    for rnd in range(args.rounds + 1):  # round 0 is warm-up (and the first touch of the snapshot buffers)
        if rnd == 1:
            cpu0, snaps0 = snaps.thread_cpu_s, snaps.version
        for mode in args.modes:
            # a block's first step finds nothing in flight (the previous block's work was joined untimed):
            # it runs untimed, so every timed step carries the previous step's background work
            for k in range(args.steps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                logits = engine.forward(input_ids=ids[:, :-1])
                F.cross_entropy(logits[0], ids[0, 1:]).backward()
                if mode == "snapshot":
                    snaps.wait_copied()
                elif copier is not None:
                    copier.join()
                    copier = None
                engine.step(1e-4)
                step += 1
                if mode == "snapshot":
                    snaps.after_step(step)
                elif mode == "copy":
                    copier = threading.Thread(target=copy_slice, daemon=True)
                    copier.start()
                elif mode == "dcp":
                    if pending is not None:
                        pending.result()
                    pending = dcp.async_save({"model": model.state_dict(), "optim": engine.optimizer.state_dict()},
                                             checkpoint_id=ckdir, process_group=dcp_pg)
                dt = time.perf_counter() - t0
                if rnd and k:
                    times[mode].append(dt)
            snaps.join()
            if copier is not None:
                copier.join()
                copier = None
            if pending is not None:
                pending.result()
                pending = None
    gathered = [None] * rt.world_size
    cpu = (snaps.thread_cpu_s - cpu0) / max(1, snaps.version - snaps0)
    dist.all_gather_object(gathered, (times, cpu))
    if rt.rank == 0:
        merged = {m: [max(t[m][i] for t, _ in gathered) for i in range(len(times[m]))] for m in args.modes}
        with open(args.out_json, "w") as f:
            json.dump({"times": merged, "params": sum(p.numel() for p in model.parameters()),
                       "snapshot_thread_cpu_s": max(c for _, c in gathered)}, f)
    rt.close()


def run_step_long(args) -> dict:
    """The step part with --seq-long tokens per rank: the snapshot's cost is per step, the step grows."""
    return run_step(argparse.Namespace(**{**vars(args), "seq": args.seq_long, "rounds": args.rounds_long,
                                          "steps": args.steps_long}))


def run_step(args) -> dict:
    out = os.path.join(args.workdir, "step.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", "step", "--seq", str(args.seq), "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--workdir", args.workdir, "--out-json", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if r.returncode:  # each rank's own error lines first: the tail is mostly torchrun's summary
        lines = sorted((line for line in r.stderr.splitlines() if line.startswith("[rank")), key=lambda x: x[:8])
        raise RuntimeError("\n".join(lines)[:6000] or r.stderr[-3000:])
    with open(out) as f:
        data = json.load(f)
    med = {m: statistics.median(t) for m, t in data["times"].items()}
    rows = {m: {"median_s": med[m], "min_s": min(t), "max_s": max(t), "n": len(t),
                "overhead_vs_off": med[m] / med["off"] - 1} for m, t in data["times"].items()}
    ratio = rows["snapshot"]["overhead_vs_off"] / rows["dcp"]["overhead_vs_off"] \
        if rows["dcp"]["overhead_vs_off"] > 0 else None
    return {"params": data["params"], "seq_per_rank": args.seq, "modes": rows, "snapshot_over_dcp_overhead": ratio,
            "snapshot_thread_cpu_s": data["snapshot_thread_cpu_s"],
            "snapshot_cpu_over_step": data["snapshot_thread_cpu_s"] / med["off"]}


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


# ---------------------------------------------------------------- recovery and kill trials

TRIAL = ["data.seq_len_min=32", "data.seq_len_max=160", "data.tokens_per_step=640", "train.warmup_steps=1",
         "train.deterministic=true"]
RESTORED = re.compile(r"restored snapshot (\d+) \(step (\d+)\)[^|]*\| (.*) \| started=([\d.]+) "
                      r"rendezvous=([\d.]+),([\d.]+) t=([\d.]+)")


def torchrun_train(sets: list[str], restarts: int, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2", "-m", "dist.launch", "train",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return r


def recovery_phases(stderr: str) -> dict:
    """Seconds from the SIGKILL to the restored state, by phase: restart (torchrun sees the failure, stops
    the other workers, the agents' rendezvous, new processes), imports, rendezvous (the workers' process
    group), build (model, engine, snapshot groups), then the restore: scan (read and check this host's
    memory), manifests, fetch (blocks from peers), decode, load."""
    kill = float(re.search(r"fault injection: SIGKILL .* t=([\d.]+)", stderr).group(1))
    m = RESTORED.search(stderr)
    restore = {k: float(v) for k, v in (x.split("=") for x in m.group(3).split())}
    started, rdzv0, rdzv1, done = (float(m.group(i)) for i in (4, 5, 6, 7))
    return {"restored_step": int(m.group(2)), "total_s": done - kill, "restart_s": started - kill,
            "imports_s": rdzv0 - started, "rendezvous_s": rdzv1 - rdzv0,
            "build_s": max(0.0, done - sum(restore.values()) - rdzv1), **restore}


def run_recovery(args) -> list[dict]:
    rows = []
    for trial in range(args.recovery_trials):
        with tempfile.TemporaryDirectory(prefix="bench-fault-") as tmp:
            r = torchrun_train(TRIAL + ["train.steps=8", "fault.snapshot_every=1", "fault.kill_step=4",
                                        "fault.kill_rank=1", "log.level=info", f"log.dir={tmp}/log"], 1, args.timeout)
        rows.append({"trial": trial, **recovery_phases(r.stderr)})
    return rows


def final_state(folder: str) -> dict:
    """Model tensors and AdamW state of a checkpoint folder, flat: name -> tensor."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update({f"model.{k}": v for k, v in load_file(os.path.join(folder, f)).items()})
    opt = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
    out.update({f"optim.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()})
    return out


def run_trials(args) -> dict:
    """`--kill-trials` torchrun jobs (2 ranks, tiny config, snapshots every step, --max-restarts 1), each
    with one rank SIGKILLed at a random step, after the step or in the middle of its snapshot's copy; the
    final parameters and optimizer state compared bit for bit with an uninterrupted run."""
    import random

    import torch

    steps, rng = 8, random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-fault-") as tmp:
        torchrun_train(TRIAL + [f"train.steps={steps}", "log.level=warning", f"log.dir={tmp}/ref/log",
                                f"checkpoint.dir={tmp}/ref/ck"], 0, args.timeout)
        ref = final_state(f"{tmp}/ref/ck/step-{steps}")
        rows = []
        for trial in range(args.kill_trials):
            step, rank, phase = rng.randint(1, steps - 1), rng.randint(0, 1), rng.choice(["step", "copy"])
            d = f"{tmp}/t{trial}"
            r = torchrun_train(TRIAL + [f"train.steps={steps}", "fault.snapshot_every=1", f"fault.kill_step={step}",
                                        f"fault.kill_rank={rank}", f"fault.kill_phase={phase}", "log.level=info",
                                        f"log.dir={d}/log", f"checkpoint.dir={d}/ck"], 1, args.timeout)
            got = final_state(f"{d}/ck/step-{steps}")
            differ = sorted(k for k in ref if k not in got or not torch.equal(ref[k], got[k]))
            m = RESTORED.search(r.stderr)
            rows.append({"trial": trial, "kill_step": step, "kill_rank": rank, "phase": phase,
                         "killed": "fault injection: SIGKILL" in r.stderr, "restored_step": int(m.group(2)) if m else None,
                         "tensors": len(ref), "bit_exact": not differ and got.keys() == ref.keys(),
                         "differ": differ[:5]})
            print(f"trial {trial}: {rows[-1]}", file=sys.stderr)
    return {"steps": steps, "seed": args.seed, "trials": rows,
            "bit_exact": sum(r["bit_exact"] and r["killed"] for r in rows)}


# ---------------------------------------------------------------- modelled 8B on H100s

def run_model8b(args) -> dict:
    """dist.fault.cost for launch/llama3-8b-128k.toml: 8 H100s per host, each GPU's FSDP shard as in the
    8-GPU run, xor parity over groups of 4 hosts; the step at the config's shortest and longest sequences."""
    from dataclasses import asdict

    from dist.config import load_config
    from dist.fault.codec import make_code
    from dist.fault.cost import Bandwidths, blob_bytes, snapshot_cost, step_time

    cfg = load_config(os.path.join(ROOT, "launch", "llama3-8b-128k.toml"), [])
    bw, world, code = Bandwidths(), 8, make_code("xor", 4)
    blob = blob_bytes(cfg, world)
    rows = []
    for seq in (cfg.data.seq_len_min, cfg.data.seq_len_max):
        step = step_time(cfg, world, seq, bw)
        rows.append({"seq_len": seq, **snapshot_cost(blob, gpus_per_host=8, code=code, step_s=step, bw=bw)})
    return {"config": "launch/llama3-8b-128k.toml", "gpus_per_host": 8, "parity": "xor, group of 4 hosts",
            "bandwidths": asdict(bw), "rows": rows}


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
    for s in (res[p] for p in ("step", "steplong") if p in res):
        lines += [f"## Step time, {s['params'] / 1e6:.0f}M parameters, 2 CPU ranks, {s['seq_per_rank']} tokens/rank",
                  "", "| mode | median s | min | max | n | overhead vs off |", "|---|---|---|---|---|---|"]
        for mode, r in s["modes"].items():
            lines.append(f"| {mode} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['n']} | "
                         f"{100 * r['overhead_vs_off']:+.1f}% |")
        ratio = s["snapshot_over_dcp_overhead"]
        lines += ["", f"Snapshot overhead / DCP async_save overhead: {ratio:.3f}" if ratio is not None and ratio >= 0
                  else "Snapshot overhead / DCP async_save overhead: none measurable (a median at or below off's)"
                  if ratio is not None else "DCP async_save showed no overhead in this run", "",
                  f"CPU the snapshot thread uses per snapshot (copy, checksum, commit; slowest rank): "
                  f"{s['snapshot_thread_cpu_s']:.3f} s = {100 * s['snapshot_cpu_over_step']:.1f}% of the median "
                  "step without snapshots. Both cores run the two ranks' compute, so this CPU time is taken "
                  "from the step.", ""]
        if "copy" in s["modes"]:
            modes = s["modes"]
            over_copy = (1 + modes["snapshot"]["overhead_vs_off"]) / (1 + modes["copy"]["overhead_vs_off"]) - 1
            lines[-1:-1] = ["", "copy: the control, a plain low-priority thread copying the same bytes into host "
                            "memory each step and nothing else (no checksum, no commit, no shared memory): what any "
                            f"host copy costs this step here. Snapshot over copy: {100 * over_copy:+.1f}%."]
    if "codec" in res:
        lines += ["## Codes (group of 4, data bytes per second)", "",
                  "| code | encode GB/s (min-max) | rebuild GB/s (min-max) | members rebuilt |", "|---|---|---|---|"]
        for r in res["codec"]:
            lines.append(f"| {r['code']} | {r['encode_GBps']:.2f} ({r['encode_min']:.2f}-{r['encode_max']:.2f}) | "
                         f"{r['rebuild_GBps']:.2f} ({r['rebuild_min']:.2f}-{r['rebuild_max']:.2f}) | {r['lost']} |")
        lines.append("")
    if "recovery" in res:
        cols = ["total_s", "restart_s", "imports_s", "rendezvous_s", "build_s", "scan_s", "manifests_s", "fetch_s",
                "decode_s", "load_s"]
        lines += ["## Recovery after SIGKILL of rank 1 (tiny config, 2 ranks), seconds", "",
                  "restart: torchrun notices the failure, stops the other worker, its rendezvous, new processes; "
                  "imports; rendezvous: the workers' process group; build: model, engine, snapshot groups; "
                  "then the restore: scan and check host memory, manifests, fetch, decode, load.", "",
                  "| trial | " + " | ".join(c.removesuffix("_s") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in res["recovery"]:
            lines.append(f"| {r['trial']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
        lines.append("")
    if "trials" in res:
        t = res["trials"]
        lines += [f"## Kill trials: {t['bit_exact']} of {len(t['trials'])} bit-exact", "",
                  f"2 ranks, tiny config, {t['steps']} steps, snapshots every step, torchrun --max-restarts 1; "
                  f"seed {t['seed']}. Final parameters and AdamW state against an uninterrupted run.", "",
                  "| trial | killed rank | at step | phase | restored step | tensors | bit-exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in t["trials"]:
            lines.append(f"| {r['trial']} | {r['kill_rank']} | {r['kill_step']} | {r['phase']} | "
                         f"{r['restored_step'] if r['restored_step'] is not None else 'none (from scratch)'} | "
                         f"{r['tensors']} | {'yes' if r['bit_exact'] and r['killed'] else 'NO'} |")
        lines.append("")
    if "model8b" in res:
        r8 = res["model8b"]
        bw = r8["bandwidths"]
        lines += [f"## Modelled: every-step snapshots of {r8['config']} on H100s (dist.fault.cost)", "",
                  f"{r8['gpus_per_host']} GPUs per host, {r8['parity']}; blob per GPU "
                  f"{r8['rows'][0]['blob_bytes'] / 1e9:.2f} GB (FSDP shard of weights + AdamW m, v). Bandwidths: "
                  f"PCIe device-to-host {bw['pcie_d2h'] / 1e9:g} GB/s per GPU, HBM {bw['hbm'] / 1e12:g} TB/s, "
                  f"host memory for checksum + parity {bw['host_mem'] / 1e9:g} GB/s per host, NIC "
                  f"{bw['nic'] / 1e9:g} GB/s per GPU, dense GEMMs {bw['gemm_flops'] / 1e12:.0f} TFLOP/s per GPU; "
                  "attention from dist.sim (TokenRing over NVLink). Step pays: HBM reads of the copy + parity "
                  "bytes on the NIC in full + whatever does not fit in a step.", "",
                  "| sequence | step s | copy s | host s | NIC s | added s | overhead |",
                  "|---|---|---|---|---|---|---|"]
        for r in r8["rows"]:
            lines.append(f"| {r['seq_len']} | {r['step_s']:.2f} | {r['copy_s']:.3f} | {r['host_s']:.3f} | "
                         f"{r['nic_s']:.3f} | {r['added_s']:.3f} | {100 * r['overhead']:.2f}% |")
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
    p.add_argument("--parts", default="step,steplong,codec,recovery,trials,model8b,survival")
    p.add_argument("--seq", type=int, default=256, help="tokens per rank per step (step part)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode per round (after one untimed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-long", type=int, default=1024, help="tokens per rank (steplong part)")
    p.add_argument("--steps-long", type=int, default=2)
    p.add_argument("--rounds-long", type=int, default=2)
    p.add_argument("--codec-mb", type=int, default=64)
    p.add_argument("--codec-repeats", type=int, default=5)
    p.add_argument("--recovery-trials", type=int, default=3)
    p.add_argument("--kill-trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="kill trials: random steps, ranks and phases")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--merge", action="store_true", help="add these parts to the results already in --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    p.add_argument("--modes", default="off,copy,snapshot,dcp", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.modes = args.modes.split(",")
    if args.worker == "step":
        return step_worker(args)
    parts = args.parts.split(",")
    start = f"at the start of {'+'.join(parts)}"
    res = {"date": today(), "machine": f"{machine()} {start}"}
    path = os.path.join(args.out, "bench_fault.json")
    if args.merge and os.path.exists(path):  # parts recorded by several runs, e.g. timed ones apart
        with open(path) as f:
            old = json.load(f)
        res = {**old, "date": res["date"],
               "machine": f"{old['machine']}; load average {os.getloadavg()[0]:.1f} {start}"}
    with tempfile.TemporaryDirectory(prefix="bench-fault-") as work:
        args.workdir = work
        for part in parts:
            t0 = time.perf_counter()
            res[part] = {"step": run_step, "steplong": run_step_long, "codec": run_codec, "recovery": run_recovery,
                         "trials": run_trials, "survival": run_survival, "model8b": run_model8b}[part](args)
            print(f"{part}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    md = markdown(res)
    write_results("bench_fault", res, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
