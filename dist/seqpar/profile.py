"""Measure the planner's compute coefficients on this machine and write them as a CostModel JSON.

    python -m dist.seqpar.profile                          # tiny preset, CPU or the GPU it finds
    python -m dist.seqpar.profile --preset llama3-8b --lengths 2048,4096,8192,16384 --out cost.json

Runs the model's forward + backward on one rank at a few sequence lengths (warm-up, then the median
of repeats), fits time = attn_s * L^2 + linear_s * L + const_s by least squares, prints each
length's fit error, and writes the coefficients with the model's shapes and the links to the JSON
that `CostModel.load` reads (config: sp.cost_model). Communication stays the dist.sim link
profiles' (--intra-link, --inter-link): bytes are the strategy's, the rates the link's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from dist.models.llama import PRESETS, Llama

from .cost import CostModel


def step_time(model, vocab: int, seq_len: int, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one forward + backward of a [1, seq_len] batch (loss: mean of the logits)."""
    ids = torch.randint(0, vocab, (1, seq_len), device=device)
    pos = torch.arange(seq_len, device=device)[None]
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, pos).float().mean().backward()
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
    if not cuda:
        torch.set_num_threads(max(1, args.threads))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    cfg = PRESETS[args.preset].replace(max_seq_len=max(max(lengths), PRESETS[args.preset].max_seq_len))
    model = Llama(cfg, seed=0).to(device=device, dtype=dtype)
    times = []
    for n in lengths:
        times.append(step_time(model, cfg.vocab_size, n, device, args.repeats))
        print(f"L={n:7d}  fwd+bwd {times[-1] * 1e3:9.2f} ms", flush=True)
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
    out = {**cm.to_dict(), "fit": {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                   "preset": args.preset, "dtype": str(dtype), "lengths": lengths,
                                   "times_s": times, "rel_errors": errors}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
