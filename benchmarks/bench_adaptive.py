"""Adaptive SP measured: training step time with sp.adaptive against a static SP degree, beside the
cost model's prediction of the same ratio.

    python benchmarks/bench_adaptive.py              # profile this machine, then 4 ranks x both modes
    python benchmarks/bench_adaptive.py --quick      # smoke test

1. Cost model: `python -m dist.seqpar.profile --world N` on this machine (N ranks of one thread, all busy
   at once as in training: compute, the per-pass cost of each group size, the gradient all-reduce +
   optimizer), unless --cost-model names one. The adaptive runs plan with it, and it predicts both modes.
2. The same batches (synthetic data, one seed: a heterogeneous mix of lengths) trained for a few steps by
   `python -m torch.distributed.run --nproc-per-node N -m dist.launch train` in two modes, alternating,
   `--repeats` times each:
     adaptive  sp.adaptive = true, sp.max_tokens_per_rank = --capacity;
     static    sp.degree sized for the longest sequence the data may hold (seq_len_max / capacity,
               rounded up to a power of two), the rest data-parallel, one sequence per pass.
   Step times come from metrics.jsonl (the first step, a warm-up, is left out); per step the median over
   the repeats.
3. Predicted: adaptive = the plan's predicted step (plan_scatter with that cost model and capacity);
   static = the slowest data-parallel rank's sum of CostModel.time(L, degree) over the sequences
   dist.data.split_for_dp deals it (how the static runner runs them); both + the cost model's step_s.

Prints and writes the measured ratio (static / adaptive: per step median, p10-p90, and over the run)
beside the predicted one: benchmarks/results/bench_adaptive.json and bench_adaptive_<date>.md. On CPU
only ratios count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import RESULTS, machine, today, write_results  # noqa: E402
from dist.config import load_config  # noqa: E402
from dist.data import make_dataset, split_for_dp  # noqa: E402
from dist.models.llama import PRESETS  # noqa: E402
from dist.seqpar import CostModel, plan_scatter  # noqa: E402


def static_degree(seq_len_max: int, capacity: int, world: int) -> int:
    need = -(-seq_len_max // capacity)
    return min(world, 1 << max(0, (need - 1).bit_length()))


def overrides(args, mode: str, log_dir: str, cost_model: str) -> list[str]:
    common = [f"data.seq_len_min={args.seq_len_min}", f"data.seq_len_max={args.seq_len_max}",
              f"data.tokens_per_step={args.tokens_per_step}", f"train.steps={args.steps}", "train.warmup_steps=1",
              f"log.dir={log_dir}", "log.every=1", "log.level=warning", f"sp.layout={args.layout}",
              f"sp.strategy={args.strategy}"]
    if mode == "adaptive":
        return common + ["sp.adaptive=true", f"sp.max_tokens_per_rank={args.capacity}",
                         f"sp.cost_model={cost_model}", f"sp.plan_time_limit_s={args.plan_time_limit}"]
    return common + [f"sp.degree={static_degree(args.seq_len_max, args.capacity, args.world)}"]


def run_training(args, mode: str, cost_model: str, workdir: str, rep: int) -> list[float]:
    """Step seconds (rank 0's metrics.jsonl) of one launch."""
    log_dir = os.path.join(workdir, f"{mode}{rep}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world}",
           "-m", "dist.launch", "train"]
    for item in overrides(args, mode, log_dir, cost_model):
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.launch_timeout)
    if proc.returncode:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["step_s"] for r in sorted(rows, key=lambda r: r["step"])]


def profile(args, path: str) -> None:
    cmd = [sys.executable, "-m", "dist.seqpar.profile", "--preset", "tiny", "--threads", "1",
           "--world", str(args.world),
           "--lengths", args.profile_lengths, "--repeats", "5", "--strategy", args.strategy, "--out", path]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        raise RuntimeError(f"profile failed:\n{proc.stderr[-3000:]}")


def predictions(args, cm: CostModel) -> list[dict]:
    """Per step: the batch's lengths and the predicted seconds of both modes."""
    cfg = load_config(None, overrides(args, "adaptive", "unused", "")[:4])
    data = make_dataset(cfg, PRESETS["tiny"].vocab_size)
    degree = static_degree(args.seq_len_max, args.capacity, args.world)
    rows = []
    for step in range(args.steps):
        lens = [len(s) for s in data.batch(step).seqs]
        plan = plan_scatter(lens, args.world, max_tokens_per_rank=args.capacity, cost_model=cm,
                            time_limit_s=args.plan_time_limit)
        parts = split_for_dp(lens, args.world // degree)
        static = max(sum(cm.time(lens[i], degree) for i in part) for part in parts)
        sizes = sorted({len(g.ranks) for mb in plan.microbatches for g in mb})
        rows.append({"step": step + 1, "lengths": lens, "adaptive_s": cm.step_time(plan.predicted_step_s),
                     "static_s": cm.step_time(static),
                     "solver": plan.solver, "microbatches": len(plan.microbatches), "group_sizes": sizes})
    return rows


def ratio_summary(static: list[float], adaptive: list[float]) -> dict:
    r = np.array(static) / np.array(adaptive)
    return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90)),
            "run": float(sum(static) / sum(adaptive))}


def static_excess(steps) -> tuple[float, float]:
    """Least squares of (measured - predicted static seconds) = a + b x sequences over the steps: b is what
    each static pass costs beyond the cost model, a what every step costs beyond it (optimizer, loop)."""
    n = np.array([len(s["lengths"]) for s in steps], dtype=np.float64)
    excess = np.array([s["measured_static_s"] - s["static_s"] for s in steps])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], axis=1), excess, rcond=None)
    return float(a), float(b)


def markdown(res) -> str:
    c, m, p = res["config"], res["measured"], res["predicted"]
    excess = static_excess(res["steps"])
    lines = [f"# Adaptive SP measured on CPU ranks, {res['date']}", "",
             f"Machine: {res['machine']}. {c['world']} gloo ranks (one thread each), tiny model, synthetic data "
             f"(lengths {c['seq_len_min']}-{c['seq_len_max']}, {c['tokens_per_step']} tokens per step), "
             f"capacity {c['capacity']} tokens per rank; static SP degree {c['static_degree']} "
             f"(sized for the longest sequence); {c['strategy']}, {c['layout']}; {c['steps']} steps "
             f"(first left out) x {c['repeats']} launches per mode, alternating; per step the median over "
             f"launches. Cost model: `python -m dist.seqpar.profile --world {c['world']}` on this machine "
             f"(compute fit max error {100 * res['profile_max_error']:.1f}%).", "",
             "| | adaptive s/step (median) | static s/step (median) | static / adaptive per step (p10-p90) "
             "| over the run |", "|---|---|---|---|---|",
             f"| measured | {statistics.median(m['adaptive_s']):.3f} | {statistics.median(m['static_s']):.3f} "
             f"| {m['ratio']['median']:.2f}x ({m['ratio']['p10']:.2f}-{m['ratio']['p90']:.2f}) "
             f"| {m['ratio']['run']:.2f}x |",
             f"| predicted | {statistics.median(p['adaptive_s']):.3f} | {statistics.median(p['static_s']):.3f} "
             f"| {p['ratio']['median']:.2f}x ({p['ratio']['p10']:.2f}-{p['ratio']['p90']:.2f}) "
             f"| {p['ratio']['run']:.2f}x |", "",
             f"Prediction error of the run's ratio: {100 * res['ratio_error']:+.1f}% (predicted / measured - 1); "
             f"of the run's seconds: adaptive {100 * res['time_error']['adaptive']:+.1f}%, static "
             f"{100 * res['time_error']['static']:+.1f}%.",
             f"What the static runs take beyond the prediction, fitted over the steps as a + b x sequences "
             f"(one pass each): b = {1e3 * excess[1]:.1f} ms per pass, a = {1e3 * excess[0]:.0f} ms per step.", "",
             "| step | sequences | longest | adaptive groups | adaptive s measured / predicted "
             "| static s measured / predicted | measured ratio | predicted ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for s in res["steps"]:
        lines.append(f"| {s['step']} | {len(s['lengths'])} | {max(s['lengths'])} | {s['group_sizes']} "
                     f"| {s['measured_adaptive_s']:.3f} / {s['adaptive_s']:.3f} "
                     f"| {s['measured_static_s']:.3f} / {s['static_s']:.3f} "
                     f"| {s['measured_ratio']:.2f}x | {s['predicted_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len-min", type=int, default=64)
    ap.add_argument("--seq-len-max", type=int, default=4096)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--capacity", type=int, default=1024, help="sp.max_tokens_per_rank")
    ap.add_argument("--strategy", default="tokenring")
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--plan-time-limit", type=float, default=0.5)
    ap.add_argument("--profile-lengths", default="64,128,256,512,1024,2048,4096", help="cover the data's lengths")
    ap.add_argument("--cost-model", default="", help="a profile JSON (default: profile now)")
    ap.add_argument("--launch-timeout", type=int, default=300)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.tokens_per_step, args.seq_len_max = 3, 1, 2048, 1024
        args.capacity, args.profile_lengths = 256, "128,256,512,1024"

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        cost_model = args.cost_model or os.path.join(work, "cost_model.json")
        if not args.cost_model:
            profile(args, cost_model)
        with open(cost_model) as f:
            fit_errors = json.load(f).get("fit", {}).get("rel_errors", [0.0])
        cm = CostModel.load(cost_model)
        pred = predictions(args, cm)
        measured = {"adaptive": [], "static": []}
        for rep in range(args.repeats):
            for mode in (("adaptive", "static") if rep % 2 == 0 else ("static", "adaptive")):
                times = run_training(args, mode, cost_model, work, rep)
                measured[mode].append(times)
                print(f"{mode:8s} launch {rep}: " + " ".join(f"{t:.3f}" for t in times), flush=True)

    steps = []
    for i in range(1, args.steps):  # step 1 is the warm-up
        a = statistics.median(run[i] for run in measured["adaptive"])
        s = statistics.median(run[i] for run in measured["static"])
        steps.append({**pred[i], "measured_adaptive_s": a, "measured_static_s": s, "measured_ratio": s / a,
                      "predicted_ratio": pred[i]["static_s"] / pred[i]["adaptive_s"]})
    m = {"adaptive_s": [x["measured_adaptive_s"] for x in steps], "static_s": [x["measured_static_s"] for x in steps]}
    p = {"adaptive_s": [x["adaptive_s"] for x in steps], "static_s": [x["static_s"] for x in steps]}
    m["ratio"], p["ratio"] = ratio_summary(m["static_s"], m["adaptive_s"]), ratio_summary(p["static_s"], p["adaptive_s"])
    res = {"date": today(), "machine": machine(load_start),
           "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "cost_model")},
                      "static_degree": static_degree(args.seq_len_max, args.capacity, args.world)},
           "cost_model": cm.to_dict(), "profile_max_error": max(abs(e) for e in fit_errors),
           "measured": m, "predicted": p, "ratio_error": p["ratio"]["run"] / m["ratio"]["run"] - 1,
           "time_error": {k: sum(p[f"{k}_s"]) / sum(m[f"{k}_s"]) - 1 for k in ("adaptive", "static")},
           "steps": steps, "raw_step_s": measured}
    suffix = "_quick" if args.quick else ("" if args.world == 4 else f"_w{args.world}")
    md = markdown(res)
    write_results(f"bench_adaptive{suffix}", res, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
