"""Planner benchmark: plan time and fallback rate, and the predicted step time it buys.

1. Plan time p50/p99 and fallback rate (plans where the greedy plan won: the solver found nothing
   better in its time) for 64-1024 sequences on 8-256 ranks, batches drawn from the Wikipedia lengths.
2. Predicted step time (the cost model's; GPU cluster profile: Llama-3-8B bf16 on H100s, 8 per node,
   NVLink inside a node, InfiniBand NDR across; each group size runs the strategy that moves its bytes
   fastest, CostModel(strategy="auto")) of the adaptive plan against
     static  one SP degree for the whole run, sized for the longest sequence the data may hold
             (max_context / max_tokens_per_rank, rounded up to a power of two), and
     homog   the best homogeneous degree per micro-batch (the greedy plan, planned per step),
   on batches drawn from the Wikipedia lengths and from a Pareto distribution, per world size.
   Ratios: median over the batches, with the 10th-90th percentile spread.

    python benchmarks/bench_planner.py            # the full run (a few minutes on 2 cores)
    python benchmarks/bench_planner.py --quick    # smoke test

Writes benchmarks/results/bench_planner.json and benchmarks/results/bench_planner_<date>.md. The
plan times are this machine's (the planner runs on a host CPU in training too); step times are
predictions, not measurements.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, machine, today, write_results  # noqa: E402
from dist.seqpar import CostModel, plan_scatter  # noqa: E402
from dist.seqpar.planner import degrees, makespan, split_microbatches  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKIPEDIA = os.path.join(ROOT, "..", "shared", "data", "wikipedia_seq_lengths.txt.gz")  # shared/ beside the repo


def wikipedia_lengths(path: str) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.array([int(line) for line in f if line.strip()])


def draw_batch(rng, source, tokens: int, max_context: int) -> list[int]:
    """Sequences (cut at max_context) until the batch holds `tokens` tokens."""
    out, total = [], 0
    while total < tokens:
        n = int(min(source(rng), max_context))
        out.append(n)
        total += n
    return out


def static_plan_s(lens, world, cap, cm, degree) -> float:
    """Predicted step of one fixed SP degree: micro-batches as needed, longest-first in each."""
    return sum(makespan(plan, lens, cm) for _, plan in split_microbatches(lens, world, cap, cm, [degree]))


def percentiles(xs, ps):
    return [float(np.percentile(xs, p)) for p in ps]


GAIN = 1.01  # a step "gains" when the adaptive plan is predicted more than 1% faster


def needed_degree(longest: int, cap: int) -> int:
    """The smallest power-of-two group that holds the batch's longest sequence: what any homogeneous
    plan must use for the whole micro-batch holding it."""
    return 1 << max(0, (-(-longest // cap) - 1).bit_length())


def homog_by_need(vs_homog, need, per_node) -> dict:
    """Share of the batches, and their median ratio to the best homogeneous degree, by what the longest
    sequence needs: one rank (degree 1 with longest-first placement is then already optimal), a group
    inside a node, a group across nodes (the slow link)."""
    classes = {"one_rank": need == 1, "in_node": (need > 1) & (need <= per_node), "cross_node": need > per_node}
    out = {}
    for name, mask in classes.items():
        out[f"share_{name}"] = float(mask.mean())
        out[f"vs_homog_{name}"] = float(np.median(vs_homog[mask])) if mask.any() else None
        out[f"gain_share_{name}"] = float(np.mean(vs_homog[mask] > GAIN)) if mask.any() else None
    return out


def homog_sweep(wiki, cm, settings, world, batches, time_limit_s, seed):
    """Adaptive against the best homogeneous degree per step under other batch settings (Wikipedia
    lengths, one world size): where the gain appears."""
    rows = []
    for tokens_per_rank, cap, max_context in settings:
        rng = np.random.default_rng(seed)
        ratios, need = [], []
        for _ in range(batches):
            lens = draw_batch(rng, lambda r: r.choice(wiki), tokens_per_rank * world, min(max_context, world * cap))
            a = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=cm, time_limit_s=time_limit_s)
            h = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=cm, time_limit_s=0)
            ratios.append(h.predicted_step_s / a.predicted_step_s)
            need.append(needed_degree(max(lens), cap))
        ratios, need = np.array(ratios), np.array(need)
        row = {"world": world, "tokens_per_rank": tokens_per_rank, "max_tokens_per_rank": cap,
               "max_context": max_context, "batches": batches, "p10_p50_p90": percentiles(ratios, [10, 50, 90]),
               "gain_share": float(np.mean(ratios > GAIN)), **homog_by_need(ratios, need, cm.gpus_per_node)}
        rows.append(row)
        print(f"sweep N={world} tokens/rank {tokens_per_rank} cap {cap} context {max_context}: "
              f"p50 {row['p10_p50_p90'][1]:.3f}x p90 {row['p10_p50_p90'][2]:.3f}x gain in {row['gain_share']:.0%} "
              f"of steps; longest across nodes in {row['share_cross_node']:.0%}", flush=True)
    return rows


def plan_times(wiki, cm, cap, worlds, counts, repeats, time_limit_s, seed):
    rows = []
    rng = np.random.default_rng(seed)
    plan_scatter([100] * 4, 4, max_tokens_per_rank=cap, cost_model=cm)  # warm-up: dist.sim's bytes, solver start
    for world in worlds:
        for d in degrees(world):  # dist.sim's bytes per group size: once per cost model, not per plan
            cm.time(1024, d)
        for count in counts:
            times, fallbacks, micro = [], 0, []
            for _ in range(repeats):
                lens = [int(min(x, world * cap)) for x in rng.choice(wiki, count)]
                plan = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=cm, time_limit_s=time_limit_s)
                times.append(plan.solve_s)
                fallbacks += plan.solver == "greedy"
                micro.append(len(plan.microbatches))
            p50, p99 = percentiles(times, [50, 99])
            rows.append({"world": world, "sequences": count, "plan_p50_s": p50, "plan_p99_s": p99,
                         "plan_max_s": max(times), "fallback_rate": fallbacks / repeats,
                         "microbatches_median": float(np.median(micro)), "repeats": repeats})
            print(f"plan time N={world:4d} seqs={count:5d}: p50 {p50:.3f} s p99 {p99:.3f} s "
                  f"fallback {fallbacks / repeats:.0%}", flush=True)
    return rows


def step_ratios(sources, cm, cap, max_context, worlds, batches, tokens_per_rank, time_limit_s, seed):
    rows = []
    static_degree = 1 << max(0, (-(-max_context // cap) - 1).bit_length())
    for name, source in sources.items():
        for world in worlds:
            rng = np.random.default_rng(seed)
            degree = min(static_degree, world)
            adaptive, homog, static, solvers, need = [], [], [], [], []
            for _ in range(batches):
                lens = draw_batch(rng, source, tokens_per_rank * world, min(max_context, world * cap))
                a = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=cm, time_limit_s=time_limit_s)
                h = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=cm, time_limit_s=0)
                adaptive.append(a.predicted_step_s)
                homog.append(h.predicted_step_s)
                static.append(static_plan_s(lens, world, cap, cm, degree))
                solvers.append(a.solver)
                need.append(needed_degree(max(lens), cap))
            vs_static = np.array(static) / np.array(adaptive)
            vs_homog = np.array(homog) / np.array(adaptive)
            need = np.array(need)
            row = {"lengths": name, "world": world, "static_degree": degree, "batches": batches,
                   "adaptive_s_median": float(np.median(adaptive)), "homog_s_median": float(np.median(homog)),
                   "static_s_median": float(np.median(static)),
                   "vs_static_median": float(np.median(vs_static)), "vs_static_p10_p90": percentiles(vs_static, [10, 90]),
                   "vs_homog_median": float(np.median(vs_homog)), "vs_homog_p10_p90": percentiles(vs_homog, [10, 90]),
                   "vs_static_total": float(sum(static) / sum(adaptive)),
                   "vs_homog_total": float(sum(homog) / sum(adaptive)),
                   "lp_rate": solvers.count("lp") / batches,
                   "vs_homog_p10_p50_p90": percentiles(vs_homog, [10, 50, 90]),
                   "gain_share": float(np.mean(vs_homog > GAIN)),
                   **homog_by_need(vs_homog, need, cm.gpus_per_node)}
            rows.append(row)
            print(f"{name:9s} N={world:3d} static SP={degree:3d}: adaptive {row['adaptive_s_median']:.3f} s, "
                  f"vs static {row['vs_static_median']:.2f}x, vs best homogeneous {row['vs_homog_median']:.3f}x "
                  f"(all steps: {row['vs_static_total']:.2f}x, {row['vs_homog_total']:.3f}x)",
                  flush=True)
    return rows


def markdown(result) -> str:
    c = result["config"]
    lines = [f"# Planner benchmark, {result['date']}", "",
             f"Machine (plan times): {result['machine']}. Step times are the cost model's predictions for "
             f"{c['cluster']}; max_tokens_per_rank {c['max_tokens_per_rank']}, max context {c['max_context']}, "
             f"{c['tokens_per_rank']} tokens per rank per step, solver time limit {c['time_limit_s']} s.", "",
             "## Predicted step time: adaptive against static max-SP and the best homogeneous degree per step", "",
             "Per step: the median ratio over the batches (10th-90th percentile); all steps: total time over all",
             "batches (what a run takes), static / adaptive and best homogeneous / adaptive.", "",
             "| lengths | N | static SP | adaptive s (median) | vs static per step | vs static all steps "
             "| vs best homogeneous per step | vs best homogeneous all steps | LP kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["step"]:
        lines.append(f"| {r['lengths']} | {r['world']} | {r['static_degree']} | {r['adaptive_s_median']:.3f} "
                     f"| {r['vs_static_median']:.2f}x ({r['vs_static_p10_p90'][0]:.2f}-{r['vs_static_p10_p90'][1]:.2f}) "
                     f"| {r['vs_static_total']:.2f}x "
                     f"| {r['vs_homog_median']:.3f}x ({r['vs_homog_p10_p90'][0]:.3f}-{r['vs_homog_p10_p90'][1]:.3f}) "
                     f"| {r['vs_homog_total']:.3f}x | {r['lp_rate']:.0%} |")
    def share(r, name):
        med = r[f"vs_homog_{name}"]
        return f"{r[f'share_{name}']:.0%}" + (f" ({med:.3f}x, gain in {r[f'gain_share_{name}']:.0%})" if med else "")

    lines += ["", "## Against the best homogeneous degree, step by step", "",
              f"Ratio best homogeneous / adaptive per step (p10 / p50 / p90), the share of steps where adaptive is "
              f"predicted more than {100 * (GAIN - 1):.0f}% faster, and the steps split by what their longest "
              "sequence needs (share of steps, their median ratio, their share with a gain): one rank (longest "
              "<= max_tokens_per_rank), a group inside a node, a group across nodes.", "",
              "| lengths | N | p10 | p50 | p90 | steps with a gain | longest fits one rank | needs a group in a node "
              "| needs a group across nodes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["step"]:
        p10, p50, p90 = r["vs_homog_p10_p50_p90"]
        lines.append(f"| {r['lengths']} | {r['world']} | {p10:.3f} | {p50:.3f} | {p90:.3f} | {r['gain_share']:.0%} "
                     f"| {share(r, 'one_rank')} | {share(r, 'in_node')} | {share(r, 'cross_node')} |")
    if result.get("sweep"):
        lines += ["", "### Other batch settings (Wikipedia lengths)", "",
                  "| N | tokens per rank | max_tokens_per_rank | max context | p10 | p50 | p90 | steps with a gain "
                  "| longest fits one rank | needs a group in a node | needs a group across nodes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["sweep"]:
            p10, p50, p90 = r["p10_p50_p90"]
            lines.append(f"| {r['world']} | {r['tokens_per_rank']} | {r['max_tokens_per_rank']} | {r['max_context']} "
                         f"| {p10:.3f} | {p50:.3f} | {p90:.3f} | {r['gain_share']:.0%} | {share(r, 'one_rank')} "
                         f"| {share(r, 'in_node')} | {share(r, 'cross_node')} |")
    if result.get("seeds"):
        lines += ["", "### Other draws of batches (Wikipedia lengths, 30 batches each)", "",
                  "Best homogeneous / adaptive over all steps of each draw (seed "
                  f"{c['seed']} is the table above).", "",
                  "| N | seed | vs best homogeneous all steps | per step p50 | p90 | steps with a gain | vs static all steps |",
                  "|---|---|---|---|---|---|---|"]
        rows = sorted(result["seeds"] + [{**r, "seed": c["seed"]} for r in result["step"]
                                         if r["lengths"] == "wikipedia" and r["world"] in (64, 128)],
                      key=lambda r: (r["world"], r["seed"]))
        for r in rows:
            p10, p50, p90 = r["vs_homog_p10_p50_p90"]
            lines.append(f"| {r['world']} | {r['seed']} | {r['vs_homog_total']:.3f}x | {p50:.3f} | {p90:.3f} "
                         f"| {r['gain_share']:.0%} | {r['vs_static_total']:.2f}x |")
    lines += ["", "## Plan time (this machine) and fallback rate", "",
              "| N | sequences | p50 s | p99 s | max s | fallback | micro-batches |", "|---|---|---|---|---|---|---|"]
    for r in result["plan"]:
        lines.append(f"| {r['world']} | {r['sequences']} | {r['plan_p50_s']:.3f} | {r['plan_p99_s']:.3f} "
                     f"| {r['plan_max_s']:.3f} | {r['fallback_rate']:.0%} | {r['microbatches_median']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", default=WIKIPEDIA)
    ap.add_argument("--max-tokens-per-rank", type=int, default=16384)
    ap.add_argument("--max-context", type=int, default=1 << 20, help="sequences are cut here")
    ap.add_argument("--tokens-per-rank", type=int, default=8192, help="batch tokens per rank per step")
    ap.add_argument("--time-limit", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=4,
                    help="further draws of batches (seeds seed+1...) for the Wikipedia runs at N = 64, 128")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    wiki = wikipedia_lengths(args.lengths)
    cm = CostModel(strategy="auto")
    cap = args.max_tokens_per_rank
    sources = {"wikipedia": lambda rng: rng.choice(wiki),
               "pareto": lambda rng: 256 * (1 + rng.pareto(1.1))}  # median ~480, a heavy tail like code/books
    # other batch settings at N = 64: more tokens per step, less memory per rank (a larger model or
    # longer activations), contexts cut at 128K
    settings = [(args.tokens_per_rank, cap, args.max_context), (4 * args.tokens_per_rank, cap, args.max_context),
                (args.tokens_per_rank, cap // 4, args.max_context), (4 * args.tokens_per_rank, cap // 4, 1 << 17)]
    if args.quick:
        plan = plan_times(wiki, cm, cap, [8, 64], [64], 2, args.time_limit, args.seed)
        step = step_ratios(sources, cm, cap, args.max_context, [64], 2, args.tokens_per_rank, args.time_limit,
                           args.seed)
        sweep = homog_sweep(wiki, cm, settings[1:2], 64, 2, args.time_limit, args.seed)
    else:
        plan = plan_times(wiki, cm, cap, [8, 32, 64, 256], [64, 256, 1024], 10, args.time_limit, args.seed)
        step = step_ratios(sources, cm, cap, args.max_context, [16, 64, 128], 30, args.tokens_per_rank,
                           args.time_limit, args.seed)
        sweep = homog_sweep(wiki, cm, settings[1:], 64, 20, args.time_limit, args.seed)
    # the all-steps ratio to the best homogeneous degree rests on a few steps with a gain: other draws
    seeds = [] if args.quick else [
        {**r, "seed": seed} for seed in range(args.seed + 1, args.seed + 1 + args.seeds)
        for r in step_ratios({"wikipedia": sources["wikipedia"]}, cm, cap, args.max_context, [64, 128], 30,
                             args.tokens_per_rank, args.time_limit, seed)]
    result = {
        "date": today(), "machine": f"{machine()} at the end",
        "config": {
            "cluster": "Llama-3-8B bf16 on H100s, 8 per node, NVLink (nvlink-h100) inside, InfiniBand NDR "
                       "(ib-400) across, per group size the fastest strategy (CostModel(strategy=\"auto\"))",
            "cost_model": cm.to_dict(), "max_tokens_per_rank": cap, "max_context": args.max_context,
            "tokens_per_rank": args.tokens_per_rank, "time_limit_s": args.time_limit, "seed": args.seed,
            "seeds": args.seeds,
            "quick": args.quick},
        "plan": plan, "step": step, "sweep": sweep, "seeds": seeds}
    md = markdown(result)
    write_results("bench_planner_quick" if args.quick else "bench_planner", result, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
