"""Link probe: bandwidth and latency per group size, written as link profiles for dist.sim.

For each group size p (ranks 0..p-1 of the job), with gloo point-to-point ops and
each direction of a pair on its own process group (a transfer a -> b uses group
"up" when a < b, else "down"; gloo shares one connection per pair and group, and
two directions on one connection run at about half rate per direction):

  send      rank 0 -> rank 1 only: one stream, one direction of one link (peer/baseline)
  shift     every rank sends N bytes to next, receives from previous (a KV ring step)
  exchange  every rank sends N bytes to next AND N to previous at once (a TokenRing step)
  alltoall  all_to_all_single, N bytes per rank split in p chunks (one call: the
            all-gather strategy's dK/dV)
  alltoall_calls  A2A_CALLS such calls back to back, N / A2A_CALLS bytes each
            (a Ulysses step: q, k, v one call each)
  allgather all_gather of N bytes from every rank (the KV all-gather strategy's step)
  shift_1g  the shift with both directions on ONE group (what the up/down split avoids)

Times are the slowest rank's, median over repeats (NOISY x --repeats for the
shift, the collectives and the interference pattern, which vary call to call:
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
  alltoall_calls_Bps = the same of alltoall_calls, a latency per call
  allgather_Bps = N (p-1) / (t_allgather - latency)    bytes reaching a rank per second
  rate_while_computing = t_shifts alone /              the link's rate while every rank computes
                   t_shifts beside compute             on the machine's cores, as a fraction of
                   (the interference pattern)          its idle rate (the ranks' transfers wait
                                                       for the cores: TCP stack, shaping, wake-ups)
  compute_lost_while_moving = compute lost /           the fraction of compute progress lost
                   t_shifts beside compute             while the link carries data (mean over ranks)
  compute_lost_slowest                                 the same for the most-slowed rank of each
                                                       repeat (the network's work is not spread
                                                       evenly over the cores: dist.sim charges it
                                                       while a core per rank all compute)
  send_buffer_bytes = (t_lead - latency) x bandwidth   bytes a send of N has not delivered when it
                   (send_lead: rank 0's send done ->   completes (socket buffers): its sender goes
                   rank 1's answer on receiving)       on while they drain

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
import platform
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISY = 5  # the shift, the collectives and the interference pattern take NOISY x --repeats samples
# alltoall_calls makes this many calls back to back, as Ulysses runs its q, k, v: on the shaped
# testbed at P=4 three calls of N/3 ran 3-14% away from one call of N (slower at 50-200 Mbit/s on
# the switch, where TCP stalls on the crowded ports land in sequences of calls; faster at 1 Gbit/s
# and on the mesh); Ulysses' steps followed the three calls, the all-gather strategy's one call of
# its dK/dV the one call
A2A_CALLS = 3
NOISY_PATTERNS = ("shift", "alltoall", "alltoall_calls", "allgather")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4, help="ranks on loopback (standalone mode)")
    p.add_argument("--group-sizes", default=None, help="comma list, default 2..world size")
    p.add_argument("--bytes", type=int, default=4 << 20, help="message size N per transfer")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interference-s", type=float, default=0.0,
                   help="least duration of the shifts beside compute in the interference pattern, s "
                        "(0: one shift of --bytes, about what a ring step moves; the pattern runs NOISY x --repeats)")
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
                elif name == "alltoall_calls":
                    for _ in range(A2A_CALLS):
                        dist.all_to_all_single(a2a_out, a2a_in, group=g["a2a"])
                elif name == "allgather":
                    dist.all_gather(gathered, send, group=g["a2a"])
                for r in reqs:
                    r.wait()
            return run

        for name in ("shift", "send", "exchange", "alltoall", "alltoall_calls", "allgather", "shift_1g"):
            for label, numel in (("small", 16), ("large", n_elems)):
                calls = A2A_CALLS if name == "alltoall_calls" else 1
                if name.startswith("alltoall"):
                    numel = max(p, numel // calls // p * p)
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
                    records.append({"group_size": p, "pattern": name, "size": label, "bytes": numel * 4 * calls,
                                    "calls": calls,
                                    "median_s": statistics.median(times),
                                    "min_s": min(times), "max_s": max(times),
                                    "runs": args.warmup + repeats})
        lead = send_lead(n_elems, pair(0, 1), pair(1, 0), g["ctrl"], rank, args.warmup, args.repeats) if member else None
        if rank == 0:
            records.append({"group_size": p, "pattern": "send_lead", "size": "large", "bytes": n_elems * 4,
                            "median_s": lead})
        if member:  # how a shift (every member sends N to next) and compute beside it slow each other
            rec = interference(pattern("shift", n_elems), g["ctrl"], args.warmup, NOISY * args.repeats,
                               min_s=args.interference_s)
            if rank == 0:
                records.append({"group_size": p, "pattern": "interference", "size": "large",
                                "bytes": n_elems * 4, **rec})
        dist.barrier()
    if rank == 0:
        _write(args, world, records)
    dist.barrier()
    dist.destroy_process_group()


def send_lead(numel: int, there, back, group, rank: int, warmup: int = 1, repeats: int = 5) -> float | None:
    """How long before rank 1 has the data rank 0's send of `numel` floats completes (median s, on
    rank 0): what the sender's socket buffers still hold when gloo releases it. Rank 1 answers on
    the other direction's group the moment its receive completes, so no clocks are compared:
    lead = answer received - send done (one latency included). Ranks other than 0 and 1 only sync."""
    import torch
    import torch.distributed as dist

    data, answer = torch.ones(numel), torch.zeros(1)
    leads = []
    for i in range(warmup + repeats):
        dist.barrier(group=group)
        if rank == 0:
            dist.isend(data, 1, group=there).wait()
            sent = time.perf_counter()
            dist.recv(answer, 1, group=back)
            if i >= warmup:
                leads.append(time.perf_counter() - sent)
        elif rank == 1:
            dist.irecv(data, 0, group=there).wait()
            dist.send(answer, 0, group=back)
    return statistics.median(leads) if rank == 0 else None


def interference(move, group, warmup: int = 1, repeats: int = 5, min_s: float = 0.0) -> dict:
    """How a transfer and the compute beside it on one machine's cores slow each other (TCP stack,
    veth/bridge, shaping, wake-ups, caches on one side; ranks that hold the cores on the other).

    Every rank of `group` calls this and computes, as the ranks of a benchmark do; `move()` posts this
    rank's part of one transfer and waits for it (run in a helper thread; gloo waits release the GIL).
    The transfer is repeated back to back until it lasts at least `min_s` (the same count on every
    rank; 0: once). Measure at the size of the messages the model will be asked about: on the
    testbed a long run of back-to-back shifts beside compute slows down far more (0.15-0.26 of the
    rate for 4 ranks on 2 cores at 1 Gbit/s over 1 s) than one step-sized shift does (0.7), and ring
    steps move one message each. Per repeat: every rank counts small matmuls for at least 0.1 s
    (time per op, all ranks at once); the transfers run alone (t_alone); they run again while every
    rank keeps computing (t_loaded, ops done). Then

        rate_while_computing      = t_alone / t_loaded (at most 1)
        compute_lost_while_moving = (t_loaded - ops x time per op) / t_loaded, averaged over ranks
        compute_lost_slowest      = the same, of the rank that lost most in each repeat

    medians over the repeats: what dist.sim's timeline charges messages and compute that meet on
    shared cores.
    """
    import math

    import torch
    import torch.distributed as dist

    a = torch.randn(128, 128)

    def ops_for(seconds: float) -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            torch.mm(a, a)
            n += 1
        return n

    dist.barrier(group=group)
    t0 = time.perf_counter()
    move()
    once = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(once, op=dist.ReduceOp.MAX, group=group)
    rounds = max(1, math.ceil(min_s / max(once.item(), 1e-6)))
    calibrate_s = max(0.1, rounds * once.item() / 2)

    def moves():
        for _ in range(rounds):
            move()

    alone, loaded, lost = [], [], []
    for i in range(warmup + repeats):
        dist.barrier(group=group)
        t_op = calibrate_s / max(1, ops_for(calibrate_s))
        dist.barrier(group=group)
        t0 = time.perf_counter()
        moves()
        t_alone = time.perf_counter() - t0
        dist.barrier(group=group)
        mover = threading.Thread(target=moves)
        ops, t0 = 0, time.perf_counter()
        mover.start()
        while mover.is_alive():
            torch.mm(a, a)
            ops += 1
        mover.join()
        t_loaded = time.perf_counter() - t0
        if i >= warmup:
            alone.append(t_alone)
            loaded.append(t_loaded)
            lost.append(max(0.0, t_loaded - ops * t_op) / t_loaded)
    figures = torch.tensor([statistics.median(alone), statistics.median(loaded), statistics.median(lost)],
                           dtype=torch.float64)
    slowest = figures[:2].clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)  # a transfer ends with its slowest rank
    dist.all_reduce(figures, group=group)
    world = dist.get_world_size(group)
    # the loss need not be spread evenly (on the testbed with a core per rank, one rank's core does
    # more of the network's work in each repeat, which one changes), and a schedule whose ranks wait
    # on each other waits for the most-slowed one
    per_repeat = torch.tensor(lost, dtype=torch.float64)
    every = [torch.empty_like(per_repeat) for _ in range(world)]
    dist.all_gather(every, per_repeat, group=group)
    most = statistics.median(torch.stack(every).max(dim=0).values.tolist())
    return {"rounds": rounds, "alone_s": slowest[0].item(), "loaded_s": slowest[1].item(),
            "rate_while_computing": min(1.0, slowest[0].item() / slowest[1].item()),
            "compute_lost_while_moving": min(0.99, figures[2].item() / world),  # 1 would be no progress at all
            "compute_lost_slowest": min(0.99, most)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _rate(rec: dict, latency: float, p: int) -> float:
    """A large record's bytes/s per rank net of a latency per call: the bytes leaving a rank for an
    all-to-all, reaching it for an all-gather, sent otherwise."""
    share = {"alltoall": (p - 1) / p, "alltoall_calls": (p - 1) / p, "allgather": p - 1}.get(rec["pattern"], 1)
    t, latencies = rec["median_s"], latency * rec.get("calls", 1)  # older records: one call
    return rec["bytes"] * share / (t - latencies if t > 2 * latencies else t)


def profiles_from_records(records, label, source, per_peer=False):
    """Reduce the measurements to one dist.sim link profile per group size. per_peer: the links are a
    mesh (a link per pair of hosts), which dist.sim charges per peer."""
    by = {(r["group_size"], r["pattern"], r["size"]): r for r in records}
    out = []
    for p in sorted({r["group_size"] for r in records}):
        lat = by[(p, "shift", "small")]["median_s"]

        def rate(pattern):
            return _rate(by[(p, pattern, "large")], lat, p)

        n, send_bps = by[(p, "send", "large")]["bytes"], rate("send")
        interference = by.get((p, "interference", "large"), {})
        lead = by.get((p, "send_lead", "large"), {}).get("median_s")
        out.append({
            "name": f"{label}-p{p}",
            "bandwidth_Bps": send_bps,
            "latency_s": lat,
            "duplex": min(1.0, rate("shift") / send_bps),
            "alltoall_Bps": rate("alltoall"),
            "alltoall_calls_Bps": rate("alltoall_calls") if (p, "alltoall_calls", "large") in by else None,
            "allgather_Bps": rate("allgather"),
            # how the link and compute on the same cores slow each other (1 and 0 when not measured)
            "rate_while_computing": interference.get("rate_while_computing", 1.0),
            "compute_lost_while_moving": interference.get("compute_lost_while_moving", 0.0),
            "compute_lost_slowest": interference.get("compute_lost_slowest",
                                                     interference.get("compute_lost_while_moving", 0.0)),
            # bytes a send has not delivered yet when it completes (dist.sim's timeline releases a
            # sender that early)
            "send_buffer_bytes": None if lead is None else min(n, max(0.0, lead - lat) * send_bps),
            "per_peer": per_peer,
            "group_size": p,
            "source": source,
        })
    return out


def _kb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1024:.0f}"


def _mbs(rate) -> str:
    return "-" if rate is None else f"{rate / 1e6:.1f}"


def _write(args, world, records):
    setting = json.loads(args.setting) if args.setting else {"link": "loopback"}
    label = args.label or ("loopback" if setting.get("link") == "loopback"
                           else f"testbed-{setting['topology']}-{setting['rate']}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine()
    source = f"measured by benchmarks/bench_links.py on {setting} ({world} ranks), {when}, {machine}"
    profiles = profiles_from_records(records, label, source, per_peer=setting.get("topology") == "mesh")
    doc = {"profiles": profiles, "measurements": records, "setting": setting, "world_size": world,
           "bytes": args.bytes, "repeats": args.repeats, "date": when, "machine": machine,
           "definitions": __doc__[__doc__.index("For each group"):__doc__.index("Run:")]}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)

    link_bps = setting.get("rate_bps")
    by = {(r["group_size"], r["pattern"], r["size"]): r for r in records}
    lines = [f"# Link probe: {label} ({when})", "", f"Machine: {machine}. Setting: {setting}. "
             f"N = {args.bytes} bytes, median (min-max) of {args.repeats} runs; of {NOISY * args.repeats} for "
             f"{', '.join(NOISY_PATTERNS)} and interference; alltoall_calls: {A2A_CALLS} calls of "
             f"N / {A2A_CALLS} back to back.", "",
             "| p | pattern | median ms | min-max ms | MB/s per rank per direction | / link setting |",
             "|---|---|---|---|---|---|"]
    for (p, pattern, size), r in sorted(by.items()):
        if size != "large" or pattern in ("interference", "send_lead"):
            continue
        mbs = _rate(r, by[(p, "shift", "small")]["median_s"], p) / 1e6
        ratio = f"{mbs * 8e6 / link_bps:.2f}" if link_bps else "-"
        lines.append(f"| {p} | {pattern} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f}-"
                     f"{r['max_s'] * 1e3:.2f} | {mbs:.1f} | {ratio} |")
    lines += ["", "shift_1g / shift: cost of both directions on one gloo group. exchange measured / model: "
              "a rank sending N to next and N to prev, against dist.sim's 2N / (bandwidth * duplex) through one NIC "
              "(N / (bandwidth * duplex) per link on a mesh).", "",
              "rate while computing: shifts alone / shifts while every rank computes; compute lost: the fraction of "
              "compute progress lost meanwhile (the interference pattern), the mean over ranks and (after the "
              "slash) that of the most-slowed rank of each repeat.", "",
              "| profile | bandwidth MB/s | latency us | duplex | alltoall MB/s (one call / calls) | allgather MB/s | rate while computing "
              "| compute lost | shift_1g / shift | exchange measured / model | send buffer KB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
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
                     f"{prof['duplex']:.2f} | {prof['alltoall_Bps'] / 1e6:.1f} / {_mbs(prof.get('alltoall_calls_Bps'))} | "
                     f"{prof['allgather_Bps'] / 1e6:.1f} | "
                     f"{prof['rate_while_computing']:.2f} | {prof['compute_lost_while_moving']:.2f} / "
                     f"{prof['compute_lost_slowest']:.2f} | "
                     f"{one_group:.2f} | {exch:.2f} | {_kb(prof.get('send_buffer_bytes'))} |")
    md = "\n".join(lines) + "\n"
    with open(args.markdown or os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------
# launcher side
# ---------------------------------------------------------------------------------------------
def _forward_args(args) -> list[str]:
    out = ["--bytes", str(args.bytes), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--interference-s", str(args.interference_s),
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
        sys.path.insert(0, REPO)
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
