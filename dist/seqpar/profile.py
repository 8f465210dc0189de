"""Measure the planner's compute coefficients on this machine and write them as a CostModel JSON.

    python -m dist.seqpar.profile                          # tiny preset, CPU or the GPU it finds
    python -m dist.seqpar.profile --preset llama3-8b --lengths 2048,4096,8192,16384 --out cost.json
    python -m dist.seqpar.profile --world 4                # 4 CPU ranks at once, + the pass terms

Runs the model's forward + backward on one rank at a few sequence lengths (warm-up, then the median
of repeats), fits time = attn_s * L^2 + linear_s * L + const_s by least squares, prints each
length's fit error, and writes the coefficients with the model's shapes and the links to the JSON
that `CostModel.load` reads (config: sp.cost_model). Communication stays the dist.sim link
profiles' (--intra-link, --inter-link): bytes are the strategy's, the rates the link's.

With --world N (CPU ranks, gloo) the N ranks run at once, all busy as in training: the compute fit
is under a full node, and short passes on every group size (one sequence, and several packed) give
doc_s, group_pass_s and latency_s (the measured latency replaces the link profile's inside the
node), and a gradient all-reduce + AdamW gives step_s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import datetime
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from dist.models.llama import PRESETS, Llama
from dist.ringattn import shard

from .cost import CostModel


def step_time(model, vocab: int, seq_len: int, device, repeats: int, warmup: int = 2, *, rank: int = 0,
              degree: int = 1, docs: int = 0) -> float:
    """Median seconds of one forward + backward of a [1, seq_len] batch (loss: mean of the logits); with
    degree > 1 this rank's zigzag shard of it (the model's attention set to the group's); with docs > 0,
    `docs` sequences of seq_len tokens packed in the pass (cu_seqlens)."""
    n = seq_len * max(docs, 1)
    ids = torch.randint(0, vocab, (n,), device=device)
    pos = torch.arange(n, device=device) % seq_len
    packed = {}
    if docs:
        packed["cu_seqlens"] = torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=device)
    if degree > 1:
        ids, pos = (shard(x, 0, rank, degree, "zigzag", **packed) for x in (ids, pos))
    ids, pos = ids[None], pos[None]
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()  # every rank starts each repeat together, as in a training step
        t0 = time.perf_counter()
        model(ids, pos, **packed).float().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def fit(lengths, times) -> tuple[tuple[float, float, float], list[float]]:
    """Least-squares (attn_s, linear_s, const_s), each clipped at 0, weighted by 1/time so every length
    counts by its relative error; and each length's relative fit error."""
    L = np.asarray(lengths, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    A = np.stack([L * L, L, np.ones_like(L)], axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    coef = np.clip(coef, 0.0, None)
    pred = np.stack([L * L, L, np.ones_like(L)], axis=1) @ coef
    return tuple(float(c) for c in coef), [float(e) for e in (pred - t) / t]


PACKED_DOCS = 4  # sequences of the probe's packed pass


def fit_doc(degrees, per_doc, n_layers: int) -> float:
    """doc_s of per_doc(d) = n_layers * 2 * d * doc_s (one attention call per document, ring block, layer,
    forward and backward) by least squares over the group sizes, clipped at 0."""
    calls = np.array([n_layers * 2 * d for d in degrees], dtype=np.float64)
    return max(0.0, float(np.asarray(per_doc, dtype=np.float64) @ calls / (calls @ calls)))


def fit_group(degrees, overheads, n_layers: int) -> tuple[float, float]:
    """(group_pass_s, latency_s) of overhead(d) = group_pass_s + n_layers * 2 * (d - 1) * latency_s by least
    squares over the group sizes, each clipped at 0 (one size: latency_s alone)."""
    steps = np.array([n_layers * 2 * (d - 1) for d in degrees], dtype=np.float64)
    y = np.asarray(overheads, dtype=np.float64)
    if len(set(degrees)) < 2:
        return 0.0, max(0.0, float(y @ steps / (steps @ steps)))
    (const, latency), *_ = np.linalg.lstsq(np.stack([np.ones_like(steps), steps], axis=1), y, rcond=None)
    if latency < 0:
        return max(0.0, float(y.mean())), 0.0
    if const < 0:
        return 0.0, max(0.0, float(y @ steps / (steps @ steps)))
    return float(const), float(latency)


def node_probe(rank: int, world: int, init: str, args, lengths: list[int], out: str) -> None:
    """One rank of `--world` ranks on this node, every one busy as in training: (1) forward + backward
    alone at each length, all ranks at once; (2) a pass of a short sequence on groups of each size
    2..world (the ranks split into groups of that size, all running); (3) the gradient all-reduce +
    clipping + AdamW of a step. Rank 0 writes the medians to `out`."""
    from dist import comm
    from dist.config import load_config
    from dist.engine import adamw, all_reduce_grads, clip_and_step

    from .planner import degrees
    from .wrap import ring_attn_fn

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(max(1, args.threads))
        cfg = PRESETS[args.preset].replace(max_seq_len=max(max(lengths), PRESETS[args.preset].max_seq_len))
        model = Llama(cfg, seed=0)
        device = torch.device("cpu")
        times = [step_time(model, cfg.vocab_size, n, device, args.repeats) for n in lengths]
        pass_len = -(-min(lengths) // (2 * world)) * 2 * world  # every group size's zigzag shards are whole
        passes, packed = {}, {}
        for d in degrees(world):
            mine = None
            for start in range(0, world, d if d > 1 else world):
                group, _ = comm.new_group_pair(list(range(start, start + d))) if d > 1 else (None, None)
                mine = group if group is not None else mine
            model.set_attention(ring_attn_fn(mine, args.strategy, "zigzag") if d > 1 else None)
            passes[d] = step_time(model, cfg.vocab_size, pass_len, device, args.repeats, rank=rank % d, degree=d,
                                  docs=1)
            packed[d] = step_time(model, cfg.vocab_size, pass_len, device, args.repeats, rank=rank % d, degree=d,
                                  docs=PACKED_DOCS)
            model.set_attention(None)
        optimizer = adamw(model, load_config(None, []))
        params = [p for p in model.parameters() if p.requires_grad]
        step = []
        for i in range(2 + args.repeats):
            model(torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None]).float().mean().backward()
            dist.barrier()
            t0 = time.perf_counter()
            all_reduce_grads(params)
            clip_and_step(params, optimizer, 1e-4, 1.0)
            step.append(time.perf_counter() - t0)
        gathered = [None] * world
        dist.all_gather_object(gathered, times)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"times": [statistics.mean(t[i] for t in gathered) for i in range(len(lengths))],
                           "pass_len": pass_len, "passes": passes, "packed": packed,
                           "step_s": statistics.median(step[2:])}, f)
        dist.barrier()  # no rank tears its pairs down while another still uses them (an abort at exit)
    finally:
        dist.destroy_process_group()


def probe_node(args, lengths: list[int]) -> dict:
    """node_probe on `args.world` spawned CPU ranks; its results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.json")
        init = "file://" + os.path.join(tmp, "store")
        mp.start_processes(node_probe, args=(args.world, init, args, lengths, out), nprocs=args.world,
                           start_method="spawn")
        with open(out) as f:
            res = json.load(f)
    for key in ("passes", "packed"):
        res[key] = {int(d): t for d, t in res[key].items()}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist.seqpar.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma-separated sequence lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--intra-link", default=None, help="dist.sim link inside a node (default: nvlink-h100 / gloo-loopback)")
    ap.add_argument("--inter-link", default=None, help="dist.sim link across nodes (default: ib-400 / gloo-loopback)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: the GPUs seen, or 8)")
    ap.add_argument("--strategy", default="tokenring")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (a rank's share of the cores)")
    ap.add_argument("--world", type=int, default=1,
                    help="CPU ranks to probe at once (all busy, as in training): compute under a full node, the "
                         "per-pass cost of each group size, the gradient all-reduce + optimizer")
    ap.add_argument("--out", default="cost_model.json")
    args = ap.parse_args(argv)
    try:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
        lengths = [int(x) for x in args.lengths.split(",")]
        if len(lengths) < 3 or min(lengths) < 2:
            raise ValueError(f"--lengths needs at least three lengths >= 2 to fit three terms, got {args.lengths!r}")
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    if args.world > 1 and (cuda or args.world & (args.world - 1)):
        print(f"error: --world probes a power-of-two number of CPU ranks (gloo), got {args.world}"
              f"{' on a GPU machine' if cuda else ''}", file=sys.stderr)
        return 2
    if not cuda:
        torch.set_num_threads(max(1, args.threads))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    cfg = PRESETS[args.preset].replace(max_seq_len=max(max(lengths), PRESETS[args.preset].max_seq_len))
    probe = None
    if args.world > 1:
        probe = probe_node(args, lengths)
        times = probe["times"]
    else:
        model = Llama(cfg, seed=0).to(device=device, dtype=dtype)
        times = [step_time(model, cfg.vocab_size, n, device, args.repeats) for n in lengths]
    for n, t in zip(lengths, times):
        print(f"L={n:7d}  fwd+bwd {t * 1e3:9.2f} ms", flush=True)
    (attn_s, linear_s, const_s), errors = fit(lengths, times)
    for n, t, e in zip(lengths, times, errors):
        print(f"L={n:7d}  measured {t * 1e3:9.2f} ms  fit error {100 * e:+6.1f}%")
    print(f"fit: attn_s={attn_s:.3e} s/token^2 linear_s={linear_s:.3e} s/token const_s={const_s:.3e} s; "
          f"max |error| {100 * max(abs(e) for e in errors):.1f}%")
    itemsize = torch.finfo(dtype).bits // 8
    cm = CostModel(attn_s=attn_s, linear_s=linear_s, const_s=const_s, strategy=args.strategy,
                   heads_q=cfg.n_heads, heads_kv=cfg.n_kv_heads, head_dim=cfg.head_dim, n_layers=cfg.n_layers,
                   itemsize=itemsize, intra_link=args.intra_link or ("nvlink-h100" if cuda else "gloo-loopback"),
                   inter_link=args.inter_link or ("ib-400" if cuda else "gloo-loopback"),
                   gpus_per_node=args.gpus_per_node or (torch.cuda.device_count() if cuda else 8))
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "preset": args.preset,
              "dtype": str(dtype), "world": args.world, "lengths": lengths, "times_s": times, "rel_errors": errors}
    if probe is not None:
        n, k = probe["pass_len"], PACKED_DOCS
        every = sorted(probe["passes"])
        per_doc = [(probe["packed"][d] - probe["passes"][d] - (k - 1) * cm.token_time(n, d)) / (k - 1) for d in every]
        doc_s = fit_doc(every, per_doc, cm.n_layers)
        # the compute fit's const_s already holds one document's calls of a one-rank pass
        cm = dataclasses.replace(cm, doc_s=doc_s, const_s=max(0.0, cm.const_s - cm.n_layers * 2 * doc_s))
        for d, x in zip(every, per_doc):
            print(f"group of {d}: each more packed sequence of {n} tokens {x * 1e3:8.2f} ms beyond compute")
        sizes = every[1:]
        overheads = [probe["passes"][d] - cm.token_time(n, d) - cm.const_s for d in sizes]
        group_pass_s, latency_s = fit_group(sizes, overheads, cm.n_layers)
        cm = dataclasses.replace(cm, group_pass_s=group_pass_s, latency_s=latency_s, step_s=probe["step_s"])
        for d, t, o in zip(sizes, (probe["passes"][d] for d in sizes), overheads):
            print(f"group of {d}: pass of {n} tokens {t * 1e3:8.2f} ms, beyond compute {o * 1e3:8.2f} ms, "
                  f"fit {(cm.pass_time(d) + cm.token_time(n, d) - t) / t * 100:+6.1f}%")
        print(f"fit: doc_s={doc_s:.3e} s per document per attention call; "
              f"group_pass_s={group_pass_s:.3e} s latency_s={latency_s:.3e} s per ring message; "
              f"step_s={cm.step_s:.3e} s (gradient all-reduce + optimizer on {args.world} ranks)")
        report.update(pass_len=n, pass_s={str(d): probe["passes"][d] for d in every},
                      packed_s={str(d): probe["packed"][d] for d in every}, packed_docs=k)
    with open(args.out, "w") as f:
        json.dump({**cm.to_dict(), "fit": report}, f, indent=1)
    print(f"wrote {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
