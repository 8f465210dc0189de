"""The serving placement search (python -m dist.disagg.plan) against measurements: ours on CPU, DistServe's.

    python -m dist.disagg.plan --probe benchmarks/results/serve_probe_cpu.json   # once, alone on the machine
    python benchmarks/bench_serve.py --requests 96 --control --out bench_serve_96  # the measured configurations
    python benchmarks/bench_plan_serve.py --bench benchmarks/results/bench_serve_96.json   # this comparison

(a) CPU at small scale: bench_serve measures 1 router + 2 workers as prefill + decode and as two colocated
workers on this machine. The planner predicts both from the probe's profile (the serving Runner's prefill
and decode step times on one core, fitted to those probe timings only, never to the bench) for the bench's
own prompt mix, output length, chunk size and SLO, and picks one; the target is the pick's measured
goodput within 10% of the best measured (on the bench's rate grid: the same grid point), at each of the
bench's SLO scales (both SLOs scaled together).
(b) Published: DistServe (OSDI'24) places OPT-13B on A100s as prefill TP2 + decode TP1 and reports 1.56
requests/s per GPU at 90% attainment of TTFT 200 ms / TPOT 100 ms on ShareGPT. We predict that placement
from the A100 datasheet profile alone (dist.disagg.plan.DEVICES["a100-80g"]); the ShareGPT trace is not
in this repository, so its lengths are an assumption stated in the table.
Writes results/bench_plan_serve.json and a dated markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, today, write_results  # noqa: E402
from dist.disagg.plan import (DEVICES, Instance, Lengths, Problem, Roofline, Slo, Trace, load_fitted, model_shape,
                              search)  # noqa: E402

SHAREGPT = ("exp:755", "exp:200", 2048)  # assumed prompt / output lengths and cap (see the docstring)


def cpu_check(bench: dict, profile_path: str, requests: int) -> list[dict]:
    """Per SLO scale of the bench (both SLOs scaled together): predicted and measured goodput of both modes."""
    args, base = bench["args"], bench["slo"]
    fitted = load_fitted(profile_path)
    prompt = Lengths(f"{args['long_len']}:{args['long_share']},{args['short_len']}:{1 - args['long_share']}")
    trace = Trace.sample(prompt, Lengths(str(args["max_tokens"])), requests, seed=0)
    rows = []
    for scale in args["slo_scales"]:
        slo = {"ttft_s": scale * base["ttft_s"], "tpot_s": scale * base["tpot_s"]}
        problem = Problem(lambda inst: fitted, trace, Slo(slo["ttft_s"], slo["tpot_s"]), max_batch=32,
                          chunk=args["chunk_tokens"])
        ranked = search(problem, [Instance("prefill")], [Instance("decode")], [Instance("colocated")], max_gpus=2)
        predicted = {"disaggregated": next(p for p in ranked if p.prefill and p.n_prefill == 1 and p.n_decode == 1),
                     "colocated": next(p for p in ranked if p.prefill is None and p.n_decode == 2)}
        measured = {mode: bench["summary"][mode]["goodput_by_scale"][str(scale)] for mode in predicted}
        pick = max(predicted, key=lambda m: predicted[m].goodput)
        best = max(measured.values())
        rows.append({"scale": scale, "slo": slo, "predicted_rps": {m: p.goodput for m, p in predicted.items()},
                     "measured_rps": measured, "pick": pick,
                     "best_measured": [m for m in measured if measured[m] == best],
                     "pick_vs_best": measured[pick] / best if best else None})
    return {"scales": rows, "profile": fitted.source, "rates": args["rates"], "base_slo": base}


def distserve_check(requests: int) -> dict:
    model, dev = model_shape("opt-13b"), DEVICES["a100-80g"]
    prompt, output, cap = SHAREGPT
    trace = Trace.sample(Lengths(prompt, cap), Lengths(output, cap), requests, seed=0)
    problem = Problem(lambda inst: Roofline(model, dev, inst.tp, inst.sp), trace, Slo(0.2, 0.1),
                      lambda p, d: dev.intra, max_batch=256)
    theirs = search(problem, [Instance("prefill", 2)], [Instance("decode", 1)], [], max_gpus=8)[0]
    cands = {"prefill": [Instance("prefill", tp, sp) for tp in (1, 2, 4) for sp in (1, 2) if tp * sp <= 4],
             "decode": [Instance("decode", tp) for tp in (1, 2, 4)],
             "colocated": [Instance("colocated", tp) for tp in (1, 2, 4)]}
    ours = search(problem, cands["prefill"], cands["decode"], cands["colocated"], max_gpus=8)[0]
    return {"published_per_gpu": 1.56, "predicted_per_gpu": theirs.per_gpu, "placement": str(theirs),
            "error": theirs.per_gpu / 1.56 - 1, "our_pick": str(ours), "our_pick_per_gpu": ours.per_gpu,
            "profile": dev.source, "lengths": f"prompts {prompt}, outputs {output}, capped at {cap} (assumed)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=os.path.join(RESULTS, "bench_serve.json"))
    ap.add_argument("--profile", default=os.path.join(RESULTS, "serve_probe_cpu.json"))
    ap.add_argument("--requests", type=int, default=400, help="simulated requests per trace")
    ap.add_argument("--out", default="bench_plan_serve")
    args = ap.parse_args(argv)
    with open(args.bench) as f:
        bench = json.load(f)
    cpu, pub = cpu_check(bench, args.profile, args.requests), distserve_check(args.requests)
    lines = [f"# bench_plan_serve {today()}", "",
             "(a) CPU: bench_serve's two configurations of 2 workers, predicted from the probe profile "
             f"({cpu['profile']}) for the bench's mix, per SLO scale of the bench (scale 1: TTFT "
             f"{cpu['base_slo']['ttft_s'] * 1e3:.0f} ms, TPOT {cpu['base_slo']['tpot_s'] * 1e3:.1f} ms, both scaled "
             f"together); measured goodput ({os.path.basename(args.bench)}) on the grid {cpu['rates']} req/s "
             "(0: no rate of the grid).", "",
             "| SLO scale | predicted disaggregated | predicted colocated | pick | measured disaggregated "
             "| measured colocated | pick's measured / best |", "|---|---|---|---|---|---|---|"]
    for r in cpu["scales"]:
        p, m = r["predicted_rps"], r["measured_rps"]
        ok = "no rate met" if r["pick_vs_best"] is None else f"{r['pick_vs_best']:.0%}"
        lines.append(f"| {r['scale']:g} | {p['disaggregated']:.2f} | {p['colocated']:.2f} | {r['pick']} "
                     f"| {m['disaggregated']:g} | {m['colocated']:g} | {ok} |")
    lines += ["", "Target: the pick's measured goodput >= 90% of the best measured at each scale.", "",
              "(b) Published: DistServe's OPT-13B placement on A100 (ShareGPT, TTFT 200 ms / TPOT 100 ms, 90%).", "",
              "| placement | published req/s per GPU | predicted | error | profile | lengths |",
              "|---|---|---|---|---|---|",
              f"| {pub['placement']} | {pub['published_per_gpu']} | {pub['predicted_per_gpu']:.2f} | "
              f"{pub['error']:+.0%} | {pub['profile']} | {pub['lengths']} |", "",
              f"Our search's own pick on the same profile (up to 8 GPUs): {pub['our_pick']}, "
              f"{pub['our_pick_per_gpu']:.2f} requests/s per GPU."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, {"cpu": cpu, "distserve": pub}, text)


if __name__ == "__main__":
    main()
