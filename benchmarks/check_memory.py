"""GPU check of dist.memory's estimate: the peak that torch.cuda.max_memory_allocated reports for the real
training loop against the estimate, per checkpointing mode.

    python benchmarks/check_memory.py                                   # 1 GPU, "1b" shape, 8K tokens
    torchrun --nproc-per-node 4 benchmarks/check_memory.py --sp 4 --seq 32768 --engine fsdp

Each mode runs `dist.train.train` for 2 steps on sequences of exactly --seq tokens, with the allocator's
peak reset before; the estimate is compared without its margin (allocator fragmentation and the CUDA
context, which max_memory_allocated does not count). Ratio = measured / estimated; the estimate is
meant to stay above the measurement (ratio <= 1) and within 10-15% of it. Needs a CUDA GPU; elsewhere
it prints the estimates only. Writes benchmarks/results/check_memory.json and a dated markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import RESULTS, today, write_results  # noqa: E402
from dist.config import load_config  # noqa: E402
from dist.memory import GiB, estimate  # noqa: E402

SHAPES = {
    "tiny": None,
    "1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=5632, max_seq_len=131072),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
    ap.add_argument("--sp", type=int, default=1, help="sp.degree")
    ap.add_argument("--strategy", default="tokenring")
    ap.add_argument("--engine", default="torch", choices=["torch", "fsdp", "deepspeed"])
    ap.add_argument("--modes", default="none,selective,full")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    rows = []
    with tempfile.TemporaryDirectory(prefix="check-memory-") as tmp:
        path = ""
        if SHAPES[args.shape]:
            from dist.models import build_model, save_hf
            from dist.models.llama import ModelConfig

            path = os.path.join(tmp, "model")
            if rank == 0:
                save_hf(build_model(ModelConfig(**SHAPES[args.shape]), dtype=getattr(torch, dtype)), path)
            if world > 1:  # the others wait for the folder (no process group exists yet)
                import time

                while not os.path.isfile(os.path.join(path, "config.json")):
                    time.sleep(1)
        for mode in args.modes.split(","):
            cfg = load_config(None, [f"model.path={path}" if path else "model.preset=tiny", f"model.dtype={dtype}",
                                     f"data.seq_len_min={args.seq}", f"data.seq_len_max={args.seq}",
                                     f"data.tokens_per_step={args.seq * world // args.sp}", "train.steps=2",
                                     "train.warmup_steps=1", f"train.engine={args.engine}",
                                     f"train.activation_checkpointing={mode}", f"sp.degree={args.sp}",
                                     f"sp.strategy={args.strategy}", f"log.dir={tmp}/log-{mode}",
                                     "runtime.ignore_memory_estimate=true", "runtime.device_memory_gb=1000",
                                     "log.level=warning"])
            est = estimate(cfg, world)
            row = {"mode": mode, "estimate_gb": est.subtotal / GiB, "tokens_per_rank": est.tokens}
            if cuda:
                from dist.train import train

                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                train(cfg)
                row["measured_gb"] = torch.cuda.max_memory_allocated() / GiB
                row["ratio"] = row["measured_gb"] / row["estimate_gb"]
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank != 0:
        return 0
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA GPU: estimates only"
    if not cuda:
        print("check_memory: torch.cuda.max_memory_allocated needs a CUDA GPU; nothing measured")
        return 0
    result = {"device": device, "world_size": world, "shape": args.shape, "seq": args.seq, "sp": args.sp,
              "strategy": args.strategy, "engine": args.engine, "rows": rows,
              "date": today()}
    lines = [f"# Memory estimate vs torch.cuda.max_memory_allocated ({result['date']})", "",
             f"{device}, {world} ranks, shape {args.shape}, {args.seq} tokens, sp {args.sp} ({args.strategy}), "
             f"engine {args.engine}; the estimate without its margin", "",
             "| checkpointing | tokens/rank | estimate GB | measured GB | measured / estimate |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['tokens_per_rank']} | {r['estimate_gb']:.2f} | {r['measured_gb']:.2f} | "
              f"{r['ratio']:.3f} |" for r in rows]
    write_results("check_memory", result, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
