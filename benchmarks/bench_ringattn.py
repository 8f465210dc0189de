"""Ring attention benchmark: forward+backward time, bytes per rank and efficiency of every strategy
(tokenring, ring, allgather, and our Ulysses from dist.seqpar), with DeepSpeed-Ulysses
(deepspeed.sequence.layer.DistributedAttention, "ds-ulysses") as the peer in the same run.

    python benchmarks/bench_ringattn.py --world-sizes 2 --seq-len 4096 --heads 8 --head-dim 64
    torchrun --nproc-per-node 2 benchmarks/bench_ringattn.py ...        # uses the env's process group

efficiency = (single-rank time of the full sequence / P) / strategy time. One thread per rank.
eff*  = the same against the single-rank step run by every rank at once ("all ranks"): what the
machine allows when all its cores compute (shared caches, memory bandwidth; ranks > cores share
cores), so eff* isolates what the strategy itself costs; ceiling = single / all ranks.
Ranks talk over the process group's backend (gloo on CPU). "NAME-nocomm" (tokenring, ring,
allgather, ulysses) runs that strategy's schedule, the same kernel calls on every rank at once,
with its messages not sent (receive buffers filled locally): measured / no-messages time is what
communication costs it. "NAME-nokernel" (tokenring, ring, allgather) is the converse: the
schedule's messages with the attention kernels returning zeros at once. The model's predictions
and their error are benchmarks/bench_model.py's.
Writes benchmarks/results/ringattn.json (or --json) and a dated markdown table beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, free_port, machine, now, results_at, write_results  # noqa: E402
from dist import comm  # noqa: E402
from dist.kernels import attention  # noqa: E402
from dist.ringattn import diag_tail, shard  # noqa: E402
from dist.ringattn import strategies as ring_strategies  # noqa: E402
from dist.seqpar import sp_attention  # noqa: E402
from dist.seqpar import ulysses as ulysses_module  # noqa: E402
from dist.sim import RING_STRATEGIES, Workload, bytes_per_rank  # noqa: E402

NOCOMM = "-nocomm"  # a strategy's schedule with its messages not sent
NOKERNEL = "-nokernel"  # a ring strategy's messages with its kernels stubbed out (zeros)
DEFAULT_STRATEGIES = ",".join(["tokenring", "ring", "allgather", "ulysses", "ds-ulysses",
                               *(name + NOCOMM for name in ("tokenring", "ring", "allgather", "ulysses"))])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", default="2", help="comma list; ignored under torchrun")
    ap.add_argument("--seq-len", type=int, default=4096, help="global sequence length")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                    help="comma list; NAME-nocomm (tokenring, ring, allgather, ulysses): NAME with its messages "
                         "not sent; NAME-nokernel (ring strategies): its messages with the kernels stubbed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="", help="free text recorded with the results (e.g. testbed link)")
    ap.add_argument("--json", default=None, help="output JSON (default benchmarks/results/ringattn.json)")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke tests)")
    args = ap.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    known = {*RING_STRATEGIES, "ulysses", "ds-ulysses", *(name + NOCOMM for name in (*RING_STRATEGIES, "ulysses")),
             *(name + NOKERNEL for name in RING_STRATEGIES)}
    unknown = [s for s in args.strategies.split(",") if s not in known]
    if unknown:
        ap.error(f"--strategies: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return args


def make_inputs(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, args.dtype)
    shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_kv, generator=g).to(dtype)
    v = torch.randn(shape_kv, generator=g).to(dtype)
    dout = torch.randn(shape_q, generator=g).to(dtype)
    return q, k, v, dout


def workload(args, world: int, device_type: str = "cpu", itemsize: int | None = None) -> Workload:
    """The dist.sim workload of this benchmark's attention call at world size `world` (args: the
    parsed arguments, or the dict stored in a results JSON); itemsize: that of --dtype unless given."""
    a = args if isinstance(args, dict) else vars(args)
    itemsize = itemsize or torch.empty(0, dtype=getattr(torch, a["dtype"])).element_size()
    return Workload(a["batch"], a["seq_len"] // world, a["heads"], a["kv_heads"] or a["heads"], a["head_dim"], world,
                    a["causal"], a["layout"], itemsize, diag_tail=diag_tail(device_type))


def sim_name(strategy: str) -> str:
    """The dist.sim schedule of a benchmarked strategy (DeepSpeed's Ulysses moves what ours does)."""
    strategy = strategy.removesuffix(NOCOMM).removesuffix(NOKERNEL)
    return "ulysses" if strategy == "ds-ulysses" else strategy


class _NoMessages:
    """Stands in for dist.comm.Exchange inside the ring strategies in a "-nocomm" step: nothing is
    sent, receive buffers are zeroed (what a copy-in would touch), so the step is the strategy's
    kernel calls alone (the argument checks before them still talk)."""

    def __init__(self, group=None):
        pass

    def send(self, tensor, peer, label="data", tag=0):
        return self

    def recv(self, tensor, peer, tag=0):
        tensor.zero_()
        return self

    def start(self):
        return self

    def wait(self):
        pass


class _CommWithoutMessages:
    """dist.comm as the strategies see it in a "-nocomm" step: collectives return their output
    buffers filled locally (the copy a receive would make), with nothing sent."""

    Exchange = _NoMessages

    @staticmethod
    def all_gather(tensor, group=None, label="data"):
        return [tensor.contiguous().clone() for _ in range(comm.group_size(group))]

    @staticmethod
    def all_to_all(tensor, group=None, label="data"):
        return tensor.contiguous().clone()

    def __getattr__(self, name):
        return getattr(comm, name)


@contextlib.contextmanager
def _without_messages():
    """Runs the block with every strategy's dist.comm swapped for _CommWithoutMessages."""
    users = (ring_strategies, ulysses_module)
    for module in users:
        module.comm = _CommWithoutMessages()
    try:
        yield
    finally:
        for module in users:
            module.comm = comm


@contextlib.contextmanager
def _without_kernels():
    """Runs the block with the ring strategies' attention kernels returning zeros at once: what is
    left is the schedule's messages (and the code around them)."""
    real = ring_strategies.attention_forward, ring_strategies.attention_backward

    def forward(q, k, v, **_):
        return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1], device=q.device)

    def backward(dout, q, k, v, out, lse, **_):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    ring_strategies.attention_forward, ring_strategies.attention_backward = forward, backward
    try:
        yield
    finally:
        ring_strategies.attention_forward, ring_strategies.attention_backward = real


def ulysses_fn(group, causal):
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing process group

    def local(q, k, v, *a, **kw):
        return attention(q, k, v, causal=causal)

    return DistributedAttention(local, group or dist.group.WORLD, scatter_idx=2, gather_idx=1)


def run_world(args):
    """Every rank runs this. Returns rank 0's (rows, meta); the others return None.

    The single-rank baseline (full sequence on rank 0 while the others wait) and every strategy are
    timed in interleaved rounds, so a change of machine load affects all of them alike.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    q, k, v, dout = make_inputs(args)

    def slowest(*values):
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    steps, skipped = {}, {}

    def single_all():  # every rank at once: the baseline that shares the machine as the strategies do
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        attention(qq, kk, vv, causal=args.causal).backward(dout)

    def single():
        if rank == 0:
            single_all()

    steps["single"], steps["single_all"] = single, single_all
    for strategy in args.strategies.split(","):
        layout = "contiguous" if strategy == "ds-ulysses" else args.layout
        mine = [shard(x, 1, rank, world, layout) for x in (q, k, v, dout)]
        if "ulysses" in strategy and (args.heads % world or args.kv_heads % world):
            skipped[strategy] = f"heads not divisible by {world}"
            continue
        if strategy.endswith(NOKERNEL):
            def step(mine=mine, strategy=strategy.removesuffix(NOKERNEL), layout=layout):
                qq, kk, vv = (x.clone().requires_grad_() for x in mine[:3])
                with _without_kernels():
                    sp_attention(qq, kk, vv, causal=args.causal, strategy=strategy, layout=layout).backward(mine[3])
        elif strategy.endswith(NOCOMM):
            def step(mine=mine, strategy=strategy.removesuffix(NOCOMM), layout=layout):
                qq, kk, vv = (x.clone().requires_grad_() for x in mine[:3])
                with _without_messages():
                    sp_attention(qq, kk, vv, causal=args.causal, strategy=strategy, layout=layout).backward(mine[3])
        elif strategy == "ds-ulysses":
            uly = ulysses_fn(None, args.causal)

            def step(mine=mine, uly=uly):
                qq, kk, vv = (x.clone().requires_grad_() for x in mine[:3])
                uly(qq, kk, vv, 0).backward(mine[3])  # batch_dim_idx=0
        else:
            def step(mine=mine, strategy=strategy, layout=layout):
                qq, kk, vv = (x.clone().requires_grad_() for x in mine[:3])
                sp_attention(qq, kk, vv, causal=args.causal, strategy=strategy, layout=layout).backward(mine[3])
        steps[strategy] = step
    times, waits = {name: [] for name in steps}, {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, fn in steps.items():
            dist.barrier()
            comm.counters.reset()
            t0 = time.perf_counter()
            fn()
            dt, wait = slowest(time.perf_counter() - t0, comm.counters.wait_s)
            if i >= args.warmup:
                times[name].append(dt)
                waits[name].append(wait)
    t1, t_all = statistics.median(times["single"]), statistics.median(times["single_all"])
    w = workload(args, world, q.device.type)
    rows = []
    for strategy in args.strategies.split(","):
        if strategy in skipped:
            rows.append(dict(strategy=strategy, skipped=skipped[strategy]))
            continue
        med, lo, hi = statistics.median(times[strategy]), min(times[strategy]), max(times[strategy])
        comm.counters.reset()
        steps[strategy]()
        sent = torch.tensor([sum(b for key, b in comm.counters.bytes.items() if key != "meta")], dtype=torch.float64)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
        model_bytes = 0 if strategy.endswith(NOCOMM) else max(bytes_per_rank(sim_name(strategy), w))
        rows.append(dict(
            strategy=strategy, world=world, median_s=med, min_s=lo, max_s=hi,
            spread=(hi - lo) / med, efficiency=(t1 / world) / med, efficiency_matched=(t_all / world) / med,
            wait_s=None if strategy == "ds-ulysses" else statistics.median(waits[strategy]),
            bytes_per_rank=int(sent.item()) if strategy != "ds-ulysses" else model_bytes,
            bytes_source="counted" if strategy != "ds-ulysses" else "model",
            model_bytes_per_rank=model_bytes,
        ))
    comm.counters.reset()
    meta = dict(single_s=t1, single_spread=(max(times["single"]) - min(times["single"])) / t1, single_all_s=t_all,
                ceiling=t1 / t_all, transport=dist.get_backend())
    return (rows, meta) if rank == 0 else None


def _spawned(rank, world, args, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        res = run_world(args)
        if rank == 0:
            torch.save(res, out_path)
        dist.barrier()  # nobody tears down the group while another rank still uses it
    finally:
        dist.destroy_process_group()



def _wait(row) -> str:
    """The slowest rank's time blocked in dist.comm (median over repeats); DeepSpeed's collectives
    bypass dist.comm, so its rows have none."""
    return "-" if row.get("wait_s") is None else f"{row['wait_s']:.3f}"


def print_rows(args, world, rows, meta):
    print(f"\nP={world}  s={args.seq_len} batch={args.batch} heads={args.heads}/{args.kv_heads} d={args.head_dim} "
          f"causal={args.causal} layout={args.layout} {args.dtype}; single rank {meta['single_s']:.3f} s "
          f"(spread {100 * meta['single_spread']:.0f}%), all ranks at once {meta['single_all_s']:.3f} s "
          f"(ceiling {meta['ceiling']:.3f}); {meta['transport']}")
    print(f"{'strategy':10} {'median s':>9} {'spread':>7} {'eff':>6} {'eff*':>6} {'wait s':>7} {'MB/rank':>9}")
    base = {r["strategy"]: r for r in rows if "median_s" in r}
    for r in rows:
        if "skipped" in r:
            print(f"{r['strategy']:10} skipped: {r['skipped']}")
            continue
        print(f"{r['strategy']:10} {r['median_s']:9.3f} {100 * r['spread']:6.1f}% {r['efficiency']:6.3f} "
              f"{r['efficiency_matched']:6.3f} {_wait(r):>7} {r['bytes_per_rank'] / 1e6:9.2f}")
    if "tokenring" in base:
        for other in ("ring", "allgather", "ulysses", "ds-ulysses", "tokenring-nocomm"):
            if other in base:
                print(f"  tokenring vs {other}: {base[other]['median_s'] / base['tokenring']['median_s']:.3f}x")


def report(args, all_rows, json_path):
    doc = dict(benchmark="ringattn", date=now(), machine=machine(), label=args.label, args=vars(args), runs=all_rows)
    day = doc["date"][:10]
    lines = [f"# ring attention fwd+bwd, {day}", "", f"Machine: {doc['machine']}. {args.label}", "",
             f"s={args.seq_len}, batch {args.batch}, heads {args.heads}/{args.kv_heads}, d={args.head_dim}, "
             f"causal={args.causal}, layout={args.layout}, {args.dtype}, one thread per rank, "
             f"{args.repeats} repeats after {args.warmup} warm-up.", "",
             "efficiency = (single rank / P) / median; eff* = (single step on every rank at once / P) / median; "
             "wait s = the slowest rank's time blocked in dist.comm (communication compute did not hide).", "",
             "| P | strategy | median s | spread | efficiency | eff* | wait s | MB sent/rank |",
             "|---|---|---|---|---|---|---|---|"]
    for run in all_rows:
        for r in run["rows"]:
            if "median_s" in r:
                lines.append(f"| {r['world']} | {r['strategy']} | {r['median_s']:.3f} | {100 * r['spread']:.1f}% | "
                             f"{r['efficiency']:.3f} | {r['efficiency_matched']:.3f} | {_wait(r)} | "
                             f"{r['bytes_per_rank'] / 1e6:.2f} |")
    for run in all_rows:
        base = {r["strategy"]: r for r in run["rows"] if "median_s" in r}
        if "tokenring" in base:
            ratios = ", ".join(f"{o} / tokenring = {base[o]['median_s'] / base['tokenring']['median_s']:.3f}"
                               for o in ("ring", "allgather", "ulysses", "ds-ulysses", "tokenring-nocomm") if o in base)
            meta = run["meta"]
            lines.append(f"\nP={run['world']}: {ratios}; single rank {meta['single_s']:.3f} s, every rank at once "
                         f"{meta['single_all_s']:.3f} s (ceiling {meta['ceiling']:.3f}); {meta['transport']}.")
    out_dir, name = results_at(json_path)
    json_path, md_path = write_results(name, doc, "\n".join(lines) + "\n", out_dir, md_name=f"{name}-{day}.md")
    print(f"\nwrote {json_path} and {md_path}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    all_rows = []
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        res = run_world(args)
        if dist.get_rank() == 0:
            rows, meta = res
            print_rows(args, dist.get_world_size(), rows, meta)
            all_rows.append(dict(world=dist.get_world_size(), rows=rows, meta=meta))
        dist.barrier()  # nobody tears down the group while another rank still uses it
        dist.destroy_process_group()
        if dist.is_initialized() or int(os.environ["RANK"]) != 0:
            return
    else:
        import tempfile

        import torch.multiprocessing as mp

        for world in (int(x) for x in args.world_sizes.split(",")):
            if args.seq_len % (2 * world):
                raise ValueError(f"--seq-len {args.seq_len} must be divisible by 2 * world size ({2 * world})")
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "res.pt")
                mp.spawn(_spawned, args=(world, args, free_port(), out), nprocs=world)
                rows, meta = torch.load(out, weights_only=False)
            print_rows(args, world, rows, meta)
            all_rows.append(dict(world=world, rows=rows, meta=meta))
    if not args.no_write:
        report(args, all_rows, args.json or os.path.join(RESULTS, "ringattn.json"))


if __name__ == "__main__":
    main()
