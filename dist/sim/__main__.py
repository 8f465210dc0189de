"""python -m dist.sim [--links FILE] [--itemsize 2] [--heads 32] [--head-dim 128]: where each strategy wins."""

from __future__ import annotations

import argparse

from .model import COMPUTE_PROFILES, LINK_PROFILES, format_table, load_link_profiles, where_each_wins


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dist.sim", description=__doc__)
    ap.add_argument("--links", help="JSON link profiles (dist.sim.load_link_profiles format) added to the built-ins")
    ap.add_argument("--compute", default="h100-bf16", choices=sorted(COMPUTE_PROFILES))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--itemsize", type=int, default=2)
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--tokens", default="4096,32768,131072", help="tokens per GPU")
    args = ap.parse_args(argv)
    links = [LINK_PROFILES[n] for n in ("nvlink-h100", "pcie-gen4", "pcie-gen5", "ib-200", "ib-400")]
    if args.links:
        links += list(load_link_profiles(args.links).values())
    compute = COMPUTE_PROFILES[args.compute]
    rows = where_each_wins(links, compute, tuple(int(x) for x in args.worlds.split(",")),
                           tuple(int(x) for x in args.tokens.split(",")), heads_q=args.heads,
                           head_dim=args.head_dim, itemsize=args.itemsize)
    print(f"causal zigzag attention fwd+bwd, batch 1, {args.heads} query heads, head_dim {args.head_dim}, "
          f"itemsize {args.itemsize}, compute {compute.name} ({compute.source})")
    print(format_table(rows))


if __name__ == "__main__":
    main()
