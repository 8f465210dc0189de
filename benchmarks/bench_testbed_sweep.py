"""The model's validation across the namespace testbed: benchmarks/bench_model.py per link type.

For every topology and link rate it builds a testbed of max(P) hosts x 1 rank (needs root),
probes the link once (benchmarks/bench_links.py, the 2-rank profile), then runs
benchmarks/bench_model.py under torchrun on the first P hosts for each P with that one profile
(`--link-profile`): kernel timings on every rank at once, predictions, measurements, error per point. The
report gives the median and worst error per link type; nothing is refitted per point.

  python benchmarks/bench_testbed_sweep.py --world-sizes 2,3,4 --rates 1gbit,200mbit --topologies switch

Writes benchmarks/results/bench_testbed_sweep.json and .md (override with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import bench_links  # noqa: E402
from benchmarks.bench_model import summary  # noqa: E402
from benchmarks.common import machine, now, results_at, write_results  # noqa: E402
from benchmarks.testbed import Testbed, parse_rate  # noqa: E402

MODEL_BENCH = os.path.join(REPO, "benchmarks", "bench_model.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="2,3,4")
    p.add_argument("--rates", default="1gbit,200mbit,50mbit", help="per direction, comma list")
    p.add_argument("--topologies", default="switch,mesh", help="mesh: a link per pair; switch: a NIC per host")
    p.add_argument("--seq-lens", default="1536,3072")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probe-bytes", type=int, default=4 << 20)
    p.add_argument("--probe-repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900, help="bound per torchrun job, s")
    p.add_argument("--prefix", default="dtb-sweep-")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "bench_testbed_sweep.json"))
    return p.parse_args(argv)


def run_point(args, tb, p: int, profile_path: str, link: str, workdir: str, port: int) -> dict:
    """bench_model.py on the first p hosts with the probed profile; its rows, or the error."""
    out_json = os.path.join(workdir, f"model_p{p}.json")
    argv = ["--seq-lens", args.seq_lens, "--heads", str(args.heads), "--head-dim", str(args.head_dim),
            "--repeats", str(args.repeats), "--link-profile", profile_path,
            "--label", f"{link} P={p}", "--json", out_json]
    results = tb.run([MODEL_BENCH, *argv], nproc_per_node=1, nnodes=p, timeout_s=args.timeout,
                     master_port=port, cwd=REPO, env={"PYTHONPATH": REPO})
    print(results[0].output[-3000:])
    bad = [r for r in results if r.returncode != 0]
    point = {"link": link, "world_size": p, "returncode": 0 if not bad else (124 if bad[0].timed_out else
                                                                               bad[0].returncode)}
    if os.path.exists(out_json):
        with open(out_json) as f:
            doc = json.load(f)
        point["rows"] = [dict(r, link=link) for r in doc["rows"]]
        point["compute"] = doc["compute"]
    if bad:
        point["error"] = "\n".join(f"host {r.host}: {r.output[-4000:]}" for r in bad)
    return point


def probe(args, tb, workdir: str, port: int) -> str:
    """The 2-rank profile of this testbed, written where bench_model reads it."""
    path = os.path.join(workdir, "links.json")
    bench_links.probe_testbed(tb, ["--bytes", str(args.probe_bytes), "--repeats", str(args.probe_repeats),
                                   "--group-sizes", "2", "--json", path, "--timeout", str(args.timeout)],
                              timeout_s=args.timeout, master_port=port, nnodes=2)
    with open(path) as f:
        profiles = json.load(f)["profiles"]
    one = os.path.join(workdir, "link_p2.json")
    with open(one, "w") as f:
        json.dump({"profiles": profiles[:1]}, f)
    return one


def write_report(args, points: list[dict]) -> None:
    rows = [r for pt in points for r in pt.get("rows", [])]
    when = now()
    doc = {"date": when, "machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "json"},
           "points": points, "summary": summary(rows, "link") if rows else []}
    lines = [f"# dist.sim on shaped links ({when})", "",
             f"Machine: {doc['machine']}. seq {args.seq_lens}, heads {args.heads}, d {args.head_dim}, causal "
             "zigzag, 1 rank per host; link probed once (2 ranks), kernels timed once per run on every rank at once; "
             "error = predicted / measured - 1.", "",
             "| link | P | seq | strategy | measured ms | predicted ms | error |", "|---|---|---|---|---|---|---|"]
    for pt in points:
        if "rows" not in pt:
            lines.append(f"| {pt['link']} | {pt['world_size']} | FAILED (rc={pt['returncode']}) | | | | |")
        for r in pt.get("rows", []):
            lines.append(f"| {r['link']} | {r['world']} | {r['seq_len']} | {r['strategy']} | "
                         f"{r['measured_s'] * 1e3:.1f} | {r['predicted_s'] * 1e3:.1f} | {100 * r['error']:+.1f}% |")
    lines += ["", "| link | points | median abs error | worst error | within 10% |", "|---|---|---|---|---|"]
    for s in doc["summary"]:
        lines.append(f"| {s['link']} | {s['points']} | {100 * s['median_abs_error']:.1f}% | "
                     f"{100 * s['worst_error']:+.1f}% | {s['within_10pct']} |")
    md = "\n".join(lines) + "\n"
    out_dir, name = results_at(args.json)
    write_results(name, doc, md, out_dir, md_name=f"{name}.md")
    print(md)


def main(argv=None):
    args = parse_args(argv)
    sizes = [int(s) for s in args.world_sizes.split(",")]
    if any(s < 2 for s in sizes):
        raise SystemExit("--world-sizes: each must be >= 2")
    points, port = [], 29700
    for topology in args.topologies.split(","):
        for rate in args.rates.split(","):
            parse_rate(rate)  # a clear error before building anything
            link = f"{topology}-{rate}"
            with tempfile.TemporaryDirectory() as wd, \
                    Testbed(hosts=max(sizes), rate=rate, topology=topology, prefix=args.prefix) as tb:
                port += 1
                profile = probe(args, tb, wd, port)
                for p in sizes:
                    port += 1
                    points.append(run_point(args, tb, p, profile, link, wd, port))
            write_report(args, points)  # after every rate, so a cut-off run keeps what it measured


if __name__ == "__main__":
    main()
