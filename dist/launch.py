"""`python -m dist.launch train|serve [--config FILE] [--set key=value ...]`.

Runs the same code under torchrun (one process per rank) or alone (one rank).
User mistakes end with one line on stderr and exit status 2; other per-rank
errors propagate to torchrun through @record.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from dist.config import ConfigError, check_world, load_config, to_toml

EXAMPLES = """examples:
  python -m dist.launch train                                   # tiny default, one process
  torchrun --nproc-per-node 2 -m dist.launch train              # tiny default, 2 data-parallel ranks
  torchrun --nproc-per-node 4 -m dist.launch train --config launch/tiny.toml --set sp.degree=2
  python -m dist.launch train --set train.steps=5 --print-config
  python -m dist.launch train --config launch/llama3-8b-128k.toml --estimate-memory --set runtime.device_memory_gb=80
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist.launch", description="dist: long-context training and serving",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,serve}")
    for name, text in (("train", "train a model (tiny synthetic default without --config)"),
                       ("serve", "serve a model over an OpenAI-compatible HTTP API")):
        p = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", help="TOML config file (see launch/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, value parsed as TOML (repeatable): --set train.lr=1e-4")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if name == "train":
            p.add_argument("--estimate-memory", action="store_true",
                           help="print the per-GPU memory estimate and exit (0: fits, 3: does not); launches nothing")
            p.add_argument("--world-size", type=int, metavar="N",
                           help="ranks to estimate for (default: the torchrun world, else sp.degree)")
    return parser.parse_args(argv)


@record
def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    estimating = args.command == "train" and args.estimate_memory
    try:
        cfg = load_config(args.config, args.overrides)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if estimating:
            world = args.world_size or (world if "WORLD_SIZE" in os.environ else cfg.sp.degree)
            if world < 1:
                raise ConfigError(f"--world-size must be >= 1, got {world}")
        check_world(cfg, world)
        if estimating:
            from dist.memory import report

            text, fits = report(cfg, world)
            if rank == 0:
                print(text)
            return 0 if fits else 3
    except ConfigError as e:
        print(f"dist: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if rank == 0:
            print(to_toml(cfg), end="")
        return 0

    from dist.runtime import setup_logging

    setup_logging(cfg.log.level, rank)
    try:
        if args.command == "train":
            from dist.train import train

            train(cfg)
        else:
            from dist.serve import serve

            serve(cfg)
    except ValueError as e:  # a user mistake found after start-up (bad checkpoint, dataset, model dir)
        if cfg.log.level == "debug":
            raise
        print(f"dist: error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except BaseException:
        # torchrun SIGTERMs the other workers as soon as one fails, then reads their error files; a worker
        # killed while @record writes its file leaves it half-written and the agent dies on it (torch 2.13,
        # seen when a peer's SIGKILL makes this rank fail). Ignore SIGTERM (in every thread) until the file
        # is written and the process exits (torchrun follows with SIGKILL if it does not).
        if "TORCHELASTIC_RUN_ID" in os.environ:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
