"""Link probe: bandwidth and latency per group size, written as link profiles for dist.sim.

For each group size p (ranks 0..p-1 of the job), with gloo point-to-point ops and
each direction of a pair on its own process group (a transfer a -> b uses group
"up" when a < b, else "down"; gloo shares one connection per pair and group, and
two directions on one connection run at about half rate per direction):

  send      rank 0 -> rank 1 only: one stream, one direction of one link (peer/baseline)
  shift     every rank sends N bytes to next, receives from previous (a KV ring step)
  exchange  every rank sends N bytes to next AND N to previous at once (a TokenRing step)
  alltoall  all_to_all_single, N bytes per rank split in p chunks (one call: Ulysses' packed
            q, k, v; the all-gather strategy's dK/dV)
  allgather all_gather of N bytes from every rank (the KV all-gather strategy's step)
  shift_1g  the shift with both directions on ONE group (what the up/down split avoids)

Times are the slowest rank's, median over repeats (NOISY x --repeats for the
shift and the collectives, which vary call to call:
gloo's all-to-all between two ranks, one connection carrying both directions,
runs at half rate per direction in about 7 calls of 8 and at full rate in the
rest, so a median of 5 can land on the rare mode; four ranks' shift on two
cores at 1 Gbit/s ranged 36-52 ms in 5 calls); latency = shift of a 64-byte
message. Rates subtract that latency. Profiles (one per p, in dist.sim's terms:
its timeline runs point-to-point messages as flows sharing each NIC or cable at
bandwidth, at bandwidth * duplex per direction while both directions carry data):

  bandwidth_Bps = N / (t_send - latency)               one-way bytes/s per rank
  latency_s     = t_shift(64 B)                        per message
  duplex        = t_send / t_shift                     rate while sending and receiving at
                                                       once, as a fraction of one-way
  alltoall_Bps  = N (p-1)/p / (t_alltoall - latency)   bytes leaving a rank per second
  allgather_Bps = N (p-1) / (t_allgather - latency)    bytes reaching a rank per second

`exchange` checks the model's other assumption: a rank that sends to two peers
shares one rate (true for one NIC per host, the switch topology); on the mesh
topology each peer has its own link, and the profiles say so (per_peer), so
dist.sim charges each link separately.

Run:
  python benchmarks/bench_links.py                                    # loopback, 4 ranks
  python benchmarks/bench_links.py --testbed --hosts 4 --rate 1gbit   # as root, shaped links
  torchrun ... benchmarks/bench_links.py ...                           # any existing job
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import machine as machine_line, now, results_at, write_results  # noqa: E402

NOISY = 5  # the shift and the collectives take NOISY x --repeats samples
NOISY_PATTERNS = ("shift", "alltoall", "allgather")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4, help="ranks on loopback (standalone mode)")
    p.add_argument("--group-sizes", default=None, help="comma list, default 2..world size")
    p.add_argument("--bytes", type=int, default=4 << 20, help="message size N per transfer")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--label", default=None, help="profile name prefix (default from the setting)")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "bench_links.json"))
    p.add_argument("--markdown", default=None, help="default: --json with .md")
    p.add_argument("--timeout", type=float, default=600, help="wall-clock bound of the whole run, s")
    tb = p.add_argument_group("testbed (needs root): build one, probe across it, tear it down")
    tb.add_argument("--testbed", action="store_true")
    tb.add_argument("--hosts", type=int, default=4)
    tb.add_argument("--rate", default="1gbit")
    tb.add_argument("--topology", choices=["switch", "mesh"], default="switch")
    tb.add_argument("--prefix", default="dtb-links-")
    tb.add_argument("--setting", default=None, help=argparse.SUPPRESS)  # passed to the workers
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# worker side (under torchrun)
# ---------------------------------------------------------------------------------------------
def _measure(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=min(args.timeout, 300)))
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(s) for s in args.group_sizes.split(",")] if args.group_sizes else list(range(2, world + 1))
    if any(not 2 <= s <= world for s in sizes):
        raise ValueError(f"--group-sizes: each must be in 2..{world}, got {args.group_sizes}")

    groups = {}
    for p in sizes:  # every rank creates every group, in the same order
        ranks = list(range(p))
        groups[p] = {name: dist.new_group(ranks) for name in ("up", "down", "ctrl", "a2a")}

    n_elems = max(1, args.bytes // 4)
    records = []
    dist.barrier()
    for p in sizes:
        g = groups[p]
        member = rank < p
        nxt, prv = (rank + 1) % p, (rank - 1) % p

        def pair(a, b, one_group=False):
            return g["a2a"] if one_group else (g["up"] if a < b else g["down"])

        def pattern(name, numel):
            send = torch.ones(numel)
            recv = [torch.empty(numel) for _ in range(2)]
            a2a_in, a2a_out = torch.ones(numel), torch.empty(numel)  # numel: a multiple of p
            gathered = [torch.empty(numel) for _ in range(p)] if name == "allgather" else []

            def run():
                reqs = []
                if name == "send":
                    if rank == 0:
                        reqs.append(dist.isend(send, 1, group=pair(0, 1)))
                    elif rank == 1:
                        reqs.append(dist.irecv(recv[0], 0, group=pair(0, 1)))
                elif name in ("shift", "shift_1g"):
                    one = name == "shift_1g"
                    reqs.append(dist.isend(send, nxt, group=pair(rank, nxt, one)))
                    reqs.append(dist.irecv(recv[0], prv, group=pair(prv, rank, one)))
                elif name == "exchange":
                    reqs.append(dist.isend(send, nxt, group=pair(rank, nxt), tag=1))
                    reqs.append(dist.isend(send, prv, group=pair(rank, prv), tag=2))
                    reqs.append(dist.irecv(recv[0], prv, group=pair(prv, rank), tag=1))
                    reqs.append(dist.irecv(recv[1], nxt, group=pair(nxt, rank), tag=2))
                elif name == "alltoall":
                    dist.all_to_all_single(a2a_out, a2a_in, group=g["a2a"])
                elif name == "allgather":
                    dist.all_gather(gathered, send, group=g["a2a"])
                for r in reqs:
                    r.wait()
            return run

        for name in ("shift", "send", "exchange", "alltoall", "allgather", "shift_1g"):
            for label, numel in (("small", 16), ("large", n_elems)):
                if name == "alltoall":
                    numel = max(p, numel // p * p)
                times = []
                if member:
                    run = pattern(name, numel)
                repeats = args.repeats * (NOISY if name in NOISY_PATTERNS else 1)
                for i in range(args.warmup + repeats):
                    if member:
                        dist.barrier(group=g["ctrl"])
                        t0 = time.perf_counter()
                        run()
                        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=g["ctrl"])
                        if i >= args.warmup:
                            times.append(dt.item())
                if rank == 0:
                    records.append({"group_size": p, "pattern": name, "size": label, "bytes": numel * 4,
                                    "median_s": statistics.median(times),
                                    "min_s": min(times), "max_s": max(times),
                                    "runs": args.warmup + repeats})
        dist.barrier()
    if rank == 0:
        _write(args, world, records)
    dist.barrier()
    dist.destroy_process_group()


def _rate(rec: dict, latency: float, p: int) -> float:
    """A large record's bytes/s per rank net of a latency: the bytes leaving a rank for an
    all-to-all, reaching it for an all-gather, sent otherwise."""
    share = {"alltoall": (p - 1) / p, "allgather": p - 1}.get(rec["pattern"], 1)
    t = rec["median_s"]
    return rec["bytes"] * share / (t - latency if t > 2 * latency else t)


def profiles_from_records(records, label, source, per_peer=False):
    """Reduce the measurements to one dist.sim link profile per group size. per_peer: the links are a
    mesh (a link per pair of hosts), which dist.sim charges per peer."""
    by = {(r["group_size"], r["pattern"], r["size"]): r for r in records}
    out = []
    for p in sorted({r["group_size"] for r in records}):
        lat = by[(p, "shift", "small")]["median_s"]

        def rate(pattern):
            return _rate(by[(p, pattern, "large")], lat, p)

        send_bps = rate("send")
        out.append({
            "name": f"{label}-p{p}",
            "bandwidth_Bps": send_bps,
            "latency_s": lat,
            "duplex": min(1.0, rate("shift") / send_bps),
            "alltoall_Bps": rate("alltoall"),
            "allgather_Bps": rate("allgather"),
            "per_peer": per_peer,
            "group_size": p,
            "source": source,
        })
    return out


def _write(args, world, records):
    setting = json.loads(args.setting) if args.setting else {"link": "loopback"}
    label = args.label or ("loopback" if setting.get("link") == "loopback"
                           else f"testbed-{setting['topology']}-{setting['rate']}")
    when = now()
    machine = machine_line()
    source = f"measured by benchmarks/bench_links.py on {setting} ({world} ranks), {when}, {machine}"
    profiles = profiles_from_records(records, label, source, per_peer=setting.get("topology") == "mesh")
    doc = {"profiles": profiles, "measurements": records, "setting": setting, "world_size": world,
           "bytes": args.bytes, "repeats": args.repeats, "date": when, "machine": machine,
           "definitions": __doc__[__doc__.index("For each group"):__doc__.index("Run:")]}

    link_bps = setting.get("rate_bps")
    by = {(r["group_size"], r["pattern"], r["size"]): r for r in records}
    lines = [f"# Link probe: {label} ({when})", "", f"Machine: {machine}. Setting: {setting}. "
             f"N = {args.bytes} bytes, median (min-max) of {args.repeats} runs; of {NOISY * args.repeats} for "
             f"{', '.join(NOISY_PATTERNS)}.", "",
             "| p | pattern | median ms | min-max ms | MB/s per rank per direction | / link setting |",
             "|---|---|---|---|---|---|"]
    for (p, pattern, size), r in sorted(by.items()):
        if size != "large":
            continue
        mbs = _rate(r, by[(p, "shift", "small")]["median_s"], p) / 1e6
        ratio = f"{mbs * 8e6 / link_bps:.2f}" if link_bps else "-"
        lines.append(f"| {p} | {pattern} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f}-"
                     f"{r['max_s'] * 1e3:.2f} | {mbs:.1f} | {ratio} |")
    lines += ["", "shift_1g / shift: cost of both directions on one gloo group. exchange measured / model: "
              "a rank sending N to next and N to prev, against dist.sim's 2N / (bandwidth * duplex) through one NIC "
              "(N / (bandwidth * duplex) per link on a mesh).", "",
              "| profile | bandwidth MB/s | latency us | duplex | alltoall MB/s | allgather MB/s "
              "| shift_1g / shift | exchange measured / model |",
              "|---|---|---|---|---|---|---|---|"]
    for prof in profiles:
        p = prof["group_size"]
        t_shift = by[(p, "shift", "large")]["median_s"]
        one_group = by[(p, "shift_1g", "large")]["median_s"] / t_shift
        n = by[(p, "exchange", "large")]["bytes"]
        # bytes a rank's one NIC carries, or each of its links (with 2 ranks next == prev: one link)
        per_link = n if prof["per_peer"] and p > 2 else 2 * n
        model = 2 * prof["latency_s"] + per_link / (prof["bandwidth_Bps"] * prof["duplex"])
        exch = by[(p, "exchange", "large")]["median_s"] / model
        lines.append(f"| {prof['name']} | {prof['bandwidth_Bps'] / 1e6:.1f} | {prof['latency_s'] * 1e6:.0f} | "
                     f"{prof['duplex']:.2f} | {prof['alltoall_Bps'] / 1e6:.1f} | {prof['allgather_Bps'] / 1e6:.1f} | "
                     f"{one_group:.2f} | {exch:.2f} |")
    md = "\n".join(lines) + "\n"
    out_dir, name = results_at(args.json)
    write_results(name, doc, md, out_dir, md_name=os.path.abspath(args.markdown) if args.markdown else f"{name}.md")
    print(md)
    print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------
# launcher side
# ---------------------------------------------------------------------------------------------
def _forward_args(args) -> list[str]:
    out = ["--bytes", str(args.bytes), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--json", os.path.abspath(args.json), "--timeout", str(args.timeout)]
    if args.markdown:
        out += ["--markdown", os.path.abspath(args.markdown)]
    if args.group_sizes:
        out += ["--group-sizes", args.group_sizes]
    if args.label:
        out += ["--label", args.label]
    return out


def probe_testbed(tb, args_list: list[str], timeout_s: float = 600, master_port: int = 29540,
                  nnodes: int | None = None) -> None:
    """Run this probe across an existing Testbed (one rank per host); raise if it fails."""
    nnodes = nnodes or tb.hosts
    setting = {"link": "testbed", "topology": tb.topology, "rate": f"{tb.rates_bps[0] / 1e6:g}mbit",
               "rate_bps": tb.rates_bps[0], "hosts": nnodes}
    results = tb.run([os.path.abspath(__file__), *args_list, "--setting", json.dumps(setting)],
                     nproc_per_node=1, nnodes=nnodes, timeout_s=timeout_s, master_port=master_port,
                     cwd=REPO, env={"PYTHONPATH": REPO})
    print(results[0].output)
    bad = [r for r in results if r.returncode != 0]
    if bad:
        raise RuntimeError(f"probe failed on host {bad[0].host} "
                           f"({'timeout' if bad[0].timed_out else 'rc=%s' % bad[0].returncode}):\n"
                           + bad[0].output[-4000:])


def main(argv=None):
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        return _measure(args)
    if args.testbed:
        from benchmarks.testbed import Testbed

        with Testbed(hosts=args.hosts, rate=args.rate, topology=args.topology, prefix=args.prefix) as tb:
            probe_testbed(tb, _forward_args(args), timeout_s=args.timeout)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(args.world_size), os.path.abspath(__file__), *_forward_args(args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sys.exit(run_bounded(cmd, env=env, timeout_s=args.timeout, cwd=REPO))


def run_bounded(cmd, *, env, timeout_s, cwd, log=None) -> int:
    """Run `cmd` (torchrun) and stop it at `timeout_s`: SIGTERM (torchrun then stops its
    workers), SIGKILL to its process group after 10 s. Returns the exit code (124 on timeout).
    `log`: an open file for stdout and stderr (default: inherited)."""
    import signal

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT if log else None)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"timed out after {timeout_s} s", file=sys.stderr)
        return 124


if __name__ == "__main__":
    main()
