"""Ring attention across the namespace testbed: measured step time beside the model's prediction.

For every topology and link rate (from compute-bound to communication-bound) it builds
a testbed of max(P) hosts x 1 rank, probes the links (benchmarks/bench_links.py, one
profile per group size), then runs benchmarks/bench_ringattn.py under torchrun on the
first P hosts for each P with `--link-profile` set to the probed profile of size P, and
collects every strategy's measured step time, bytes per rank and predicted time.
`--loopback` runs the same on loopback without a testbed (no root needed).

  python benchmarks/bench_testbed_sweep.py --world-sizes 2,3,4 \
      --rates 1gbit,200mbit,50mbit --topologies switch --repeats 9

Writes benchmarks/results/bench_testbed_sweep.json and .md (override with --json).
`--repredict` redoes every prediction of an existing JSON with the current dist.sim (from the
link and compute profiles stored with each measurement) and rewrites both files; no testbed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import bench_links  # noqa: E402
from benchmarks.bench_ringattn import DEFAULT_STRATEGIES, NOCOMM, NOKERNEL  # noqa: E402
from benchmarks.testbed import Testbed, parse_rate  # noqa: E402

RING_BENCH = os.path.join(REPO, "benchmarks", "bench_ringattn.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="2,3,4")
    p.add_argument("--rates", default="10gbit,1gbit,300mbit,100mbit", help="per direction, comma list")
    p.add_argument("--topologies", default="mesh,switch", help="mesh: a link per pair; switch: a NIC per host")
    p.add_argument("--loopback", action="store_true", help="no testbed: loopback only")
    p.add_argument("--seq-len", type=int, default=3072, help="global; a multiple of 2P for every P (zigzag)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help="NAME-nocomm rows measure NAME's compute without messages, which NAME's prediction then "
                        "uses (bench_ringattn.py); they are not counted as model points")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--probe-bytes", type=int, default=4 << 20)
    p.add_argument("--probe-repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900, help="bound per torchrun job, s (the 50 Mbit/s probe takes ~9 min)")
    p.add_argument("--prefix", default="dtb-sweep-")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "bench_testbed_sweep.json"))
    p.add_argument("--repredict", action="store_true",
                   help="redo the predictions of the existing --json with the current model; measure nothing")
    p.add_argument("--ring-bench", default=RING_BENCH, help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="after --: more arguments for bench_ringattn.py")
    return p.parse_args(argv)


def ring_args(args, profile_path: str, label: str, out_json: str) -> list[str]:
    out = ["--seq-len", str(args.seq_len), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
           "--head-dim", str(args.head_dim), "--causal" if args.causal else "--no-causal",
           "--layout", args.layout, "--strategies", args.strategies, "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--link-profile", profile_path, "--label", label,
           "--json", out_json, *args.extra]
    return out


_TIME_KEYS = ("median_s", "step_s", "measured_s", "time_s", "median")
_PRED_KEYS = ("predicted_s", "predicted", "model_s", "predicted_time_s")
_BYTES_KEYS = ("bytes_per_rank", "bytes_sent_per_rank", "bytes_sent", "bytes")


def extract_rows(doc) -> list[dict]:
    """Per-strategy rows from bench_ringattn's JSON: any dict with a "strategy" key.

    Keeps the keys it recognises (measured / predicted time, bytes per rank); the
    raw document is stored beside the rows in any case.
    """
    rows = []

    def first(d, keys):
        return next((d[k] for k in keys if isinstance(d.get(k), (int, float))), None)

    def walk(x):
        if isinstance(x, dict):
            if "strategy" in x:
                rows.append({"strategy": x["strategy"], "world_size": x.get("world", x.get("world_size")),
                             "measured_s": first(x, _TIME_KEYS), "predicted_s": first(x, _PRED_KEYS),
                             "predicted_compute_s": first(x, ("predicted_compute_s",)),
                             "bytes_per_rank": first(x, _BYTES_KEYS), "skipped": x.get("skipped"),
                             "wait_s": first(x, ("wait_s",))})
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return rows


def run_point(args, tb, p: int, profiles: list[dict], setting: dict, workdir: str, port: int) -> dict:
    """One bench_ringattn run on the first p hosts (or on loopback when tb is None)."""
    prof = [pr for pr in profiles if pr["group_size"] == p]
    profile_path = os.path.join(workdir, f"profile_p{p}.json")
    with open(profile_path, "w") as f:
        json.dump({"profiles": prof}, f, indent=1)
    label = (setting["link"] if tb is None else f"{setting['topology']}-{setting['rate']}") + f"-p{p}"
    out_json = os.path.join(workdir, f"ring_p{p}.json")
    argv = ring_args(args, profile_path, label, out_json)
    if tb is None:
        cmd = [sys.executable, args.ring_bench, "--world-sizes", str(p), *argv]
        with tempfile.TemporaryFile("w+") as log:
            rc = bench_links.run_bounded(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                         timeout_s=args.timeout, cwd=REPO, log=log)
            log.seek(0)
            output = log.read()
        print(output[-3000:])
    else:
        results = tb.run([args.ring_bench, *argv], nproc_per_node=1, nnodes=p, timeout_s=args.timeout,
                         master_port=port, cwd=REPO, env={"PYTHONPATH": REPO})
        bad = [r for r in results if r.returncode != 0]
        rc = (124 if bad[0].timed_out else bad[0].returncode) if bad else 0
        output = results[0].output if not bad else "\n".join(
            f"===== host {r.host} ({'timeout' if r.timed_out else f'rc={r.returncode}'}) =====\n{r.output[-8000:]}"
            for r in bad)
        print(results[0].output[-3000:])
    point = {**setting, "world_size": p, "profile": prof[0] if prof else None, "returncode": rc}
    if os.path.exists(out_json):  # written by rank 0 after every strategy was measured
        with open(out_json) as f:
            raw = json.load(f)
        point["raw"] = raw
        point["rows"] = extract_rows(raw)
    if rc != 0:  # kept even when the results were written (a rank that fails at exit)
        point["error"] = output[-16000:] or f"rc={rc}"
    return point


def probe(args, tb, sizes: list[int], workdir: str, port: int) -> list[dict]:
    path = os.path.join(workdir, "links.json")
    probe_args = ["--bytes", str(args.probe_bytes), "--repeats", str(args.probe_repeats), "--warmup", "1",
                  "--group-sizes", ",".join(map(str, sizes)), "--json", path, "--timeout", str(args.timeout)]
    if tb is None:
        cmd = [sys.executable, bench_links.__file__, "--world-size", str(max(sizes)), *probe_args]
        if bench_links.run_bounded(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                   timeout_s=args.timeout, cwd=REPO) != 0:
            raise RuntimeError("link probe failed on loopback")
    else:
        bench_links.probe_testbed(tb, probe_args, timeout_s=args.timeout, master_port=port)
    with open(path) as f:
        return json.load(f)["profiles"]


def write_report(args, points: list[dict], measured: dict | None = None) -> None:
    """measured: the date and machine of an earlier run whose predictions were redone (--repredict)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    when = measured["date"] if measured else now
    machine = measured["machine"] if measured else bench_links._machine()
    skip = ("ring_bench", "repredict", "json")
    doc = {"date": when, "machine": machine, "args": {k: v for k, v in vars(args).items() if k not in skip},
           "points": points}
    if measured:
        doc["repredicted"] = now
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Ring attention on shaped links ({when})", "",
             f"Machine: {machine}. seq {args.seq_len}, heads {args.heads}/{args.kv_heads}, d {args.head_dim}, "
             f"{'causal' if args.causal else 'full'}, layout {args.layout}; 1 rank per host. "
             "error = predicted / measured - 1."
             + (f" Predictions redone {now} by the current dist/sim from the stored profiles." if measured else ""), "",
             "probed: the link's rate, its duplex fraction, and its rate while every rank computes (the probe's "
             "interference pattern; the fraction of compute lost meanwhile in brackets). waiting: the slowest "
             "rank's time blocked in dist.comm (not counted for DeepSpeed). predicted compute: the strategy's "
             "-nocomm row (its schedule run without messages on the same ranks) where one ran, else the "
             "kernel flops model; a -nocomm row's own prediction is the flops model's, its error what the "
             "flops miss (not counted below). -nokernel rows: the messages with the kernels stubbed, against "
             "the model's messages alone.", "",
             "| link | P | probed MB/s | duplex | while computing | strategy | measured ms | waiting ms | predicted ms | "
             "error | predicted compute ms | MB/rank | ring / this |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errors, compute_errors, message_errors = [], [], []
    for pt in points:
        link = pt["link"] if pt["link"] == "loopback" else f"{pt['topology']} {pt['rate']}"
        prof = pt.get("profile") or {}
        bw = f"{prof['bandwidth_Bps'] / 1e6:.0f}" if prof else "-"
        dup = f"{prof['duplex']:.2f}" if prof else "-"
        if prof:
            dup += (f" | {prof.get('rate_while_computing', 1.0):.2f} "
                    f"({prof.get('compute_lost_while_moving', 0.0):.2f})")
        else:
            dup += " | -"
        if "rows" not in pt:
            lines.append(f"| {link} | {pt['world_size']} | {bw} | {dup} | FAILED (rc={pt['returncode']}) "
                         "| | | | | | | |")
            continue
        ring = next((r["measured_s"] for r in pt["rows"] if r["strategy"] == "ring" and r["measured_s"]), None)
        def ms(x):
            return f"{x * 1e3:.1f}" if x else "-"

        for r in pt["rows"]:
            m, pr, b = r["measured_s"], r["predicted_s"], r["bytes_per_rank"]
            if r.get("skipped"):
                lines.append(f"| {link} | {pt['world_size']} | {bw} | {dup} | {r['strategy']} | "
                             f"skipped: {r['skipped']} | | | | | | |")
                continue
            err = f"{pr / m - 1:+.1%}" if m and pr else "-"
            if m and pr:
                kind = next((k for k in (NOCOMM, NOKERNEL) if r["strategy"].endswith(k)), "")
                {NOCOMM: compute_errors, NOKERNEL: message_errors, "": errors}[kind].append(pr / m - 1)
            vs = f"{ring / m:.2f}x" if ring and m else "-"
            mb = f"{b / 1e6:.2f}" if b else "-"
            lines.append(f"| {link} | {pt['world_size']} | {bw} | {dup} | {r['strategy']} | {ms(m)} | "
                         f"{ms(r.get('wait_s'))} | {ms(pr)} | {err} | {ms(r.get('predicted_compute_s'))} | {mb} | {vs} |")
    if errors:
        errors = [abs(e) for e in errors]
        lines.append(f"\n{sum(e <= 0.10 for e in errors)} of {len(errors)} points within 10% of the measured time "
                     f"(largest error {100 * max(errors):.1f}%).")
    if message_errors:
        lines.append(f"The model's messages alone against the -nokernel rows (kernels stubbed): "
                     f"{100 * min(message_errors):+.1f}% to {100 * max(message_errors):+.1f}% ({len(message_errors)} rows; "
                     "not counted above).")
    if compute_errors:
        lines.append(f"The flops model's compute against the -nocomm rows: {100 * min(compute_errors):+.0f}% to "
                     f"{100 * max(compute_errors):+.0f}% ({len(compute_errors)} rows); the predictions above use "
                     "the measured compute instead.")
    for pt in points:
        if "rows" in pt and pt["returncode"] != 0:
            lines.append(f"\nNote: {pt.get('topology', pt['link'])} {pt.get('rate', '')} P={pt['world_size']}: "
                         f"results written, but a rank exited with an error afterwards (rc={pt['returncode']}; "
                         "see the JSON's error field).")
    md = "\n".join(lines) + "\n"
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.json}")


def main(argv=None):
    args = parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    sizes = [int(s) for s in args.world_sizes.split(",")]
    if any(s < 2 for s in sizes):
        raise SystemExit("--world-sizes: each must be >= 2")
    bad = [p for p in sizes if args.seq_len % (2 * p)]
    if bad:
        raise SystemExit(f"--seq-len: {args.seq_len} must be a multiple of 2P for P = {bad} (e.g. 3072 for P = 2..4)")
    if not os.path.exists(args.ring_bench):
        raise SystemExit(f"{os.path.relpath(args.ring_bench, REPO)} is missing (the ring benchmark drives this sweep)")
    if args.repredict:
        return repredict(args)
    points = []
    port = 29700
    if args.loopback:
        with tempfile.TemporaryDirectory() as wd:
            profiles = probe(args, None, sizes, wd, port)
            for p in sizes:
                points.append(run_point(args, None, p, profiles, {"link": "loopback"}, wd, port))
        write_report(args, points)
        return
    for topology in args.topologies.split(","):
        for rate in args.rates.split(","):
            setting = {"link": "testbed", "topology": topology, "rate": rate, "rate_bps": parse_rate(rate)}
            with tempfile.TemporaryDirectory() as wd, \
                    Testbed(hosts=max(sizes), rate=rate, topology=topology, prefix=args.prefix) as tb:
                port += 1
                profiles = probe(args, tb, sizes, wd, port)
                for p in sizes:
                    port += 1
                    points.append(run_point(args, tb, p, profiles, setting, wd, port))
            write_report(args, points)  # after every rate, so a cut-off run keeps what it measured


def repredict(args) -> None:
    from benchmarks import bench_ringattn

    with open(args.json) as f:
        doc = json.load(f)
    for pt in doc["points"]:
        if "raw" in pt:
            bench_ringattn.repredict(pt["raw"])
            pt["rows"] = extract_rows(pt["raw"])
    stored = argparse.Namespace(**{**doc["args"], "json": args.json})
    write_report(stored, doc["points"], measured=doc)


if __name__ == "__main__":
    main()
