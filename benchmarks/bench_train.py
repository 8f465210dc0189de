"""Training throughput: tokens/s and model FLOP utilisation (MFU) of the real training loop.

    python benchmarks/bench_train.py                      # tiny and mid configs, one rank
    torchrun --nproc-per-node 2 benchmarks/bench_train.py --configs tiny

Each config runs `dist.train.train` for warm-up + measured steps; step times
come from its metrics.jsonl. FLOPs are counted exactly per batch (6 x matmul
weights per token + causal attention, summed over each sequence's length).
The baseline in the same run is this device's measured matmul rate (fp32 on
CPU, bf16 on GPU): MFU = achieved FLOP/s / that rate. On CPU only the ratio
means anything; absolute tokens/s count only from a GPU.
Writes benchmarks/results/bench_train.json and a dated markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import RESULTS, machine, today, write_results  # noqa: E402
from dist.config import load_config  # noqa: E402

# name -> (model shape, data settings); "mid" is saved as a Hugging Face folder and loaded via model.path
CONFIGS = {
    "tiny": (None, {"data.seq_len_min": 64, "data.seq_len_max": 1024, "data.tokens_per_step": 8192}),
    "mid": (dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024),
            {"data.seq_len_min": 128, "data.seq_len_max": 2048, "data.tokens_per_step": 4096}),
    "1b": (dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=5632),
           {"data.seq_len_min": 1024, "data.seq_len_max": 16384, "data.tokens_per_step": 65536}),
}


def matmul_rate(device, dtype, n: int, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul (median of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def batch_flops(model, data, step: int) -> float:
    """Exact training FLOPs of one global batch: sum over sequences of len * flops_per_token(len)."""
    return sum((len(s) - 1) * model.flops_per_token(len(s) - 1) for s in data.batch(step).seqs)


def run_config(name: str, steps: int, warmup: int, workdir: str, device_dtype: str) -> dict:
    from dist.data import make_dataset
    from dist.models import ModelConfig, build_model, save_hf
    from dist.train import train

    shape, data_over = CONFIGS[name]
    overrides = [f"{k}={v}" for k, v in data_over.items()]
    overrides += [f"train.steps={warmup + steps}", "train.warmup_steps=1", f"log.dir={workdir}/{name}",
                  "log.level=warning", f"model.dtype={device_dtype}"]
    if shape is not None:
        path = os.path.join(workdir, f"model-{name}")
        if int(os.environ.get("RANK", 0)) == 0 and not os.path.isdir(path):
            save_hf(build_model(ModelConfig(**shape), seed=0), path)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        overrides.append(f"model.path={path}")
    cfg = load_config(None, overrides)
    out = train(cfg)
    model = out["model"]
    rows = [json.loads(x) for x in open(os.path.join(cfg.log.dir, "metrics.jsonl"))][warmup:]
    data = make_dataset(cfg, model.config.vocab_size)
    flops = [batch_flops(model, data, r["step"] - 1) / r["step_s"] for r in rows]
    tps = [r["tokens_per_s"] for r in rows]
    return {"config": name, "params_M": model.num_params() / 1e6, "steps": len(rows),
            "tokens_per_step": cfg.data.tokens_per_step,
            "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps), "flops_per_s_median": statistics.median(flops),
            "mem_mb": rows[-1]["mem_mb"], "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per config")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    peak = matmul_rate(device, dtype, 8192 if cuda else 1024)
    world = int(os.environ.get("WORLD_SIZE", 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for name in args.configs.split(","):
            r = run_config(name, args.steps, args.warmup, tmp, "bfloat16" if cuda else "float32")
            r["mfu"] = r["flops_per_s_median"] / (peak * world)
            results.append(r)
    if int(os.environ.get("RANK", 0)):
        return
    host = machine() + ("" if cuda else f", {torch.get_num_threads()} threads/rank")
    header = (f"# bench_train ({today()}, {host}, {world} rank(s), "
              f"{'bf16' if cuda else 'fp32'})\n\nBaseline: measured matmul rate {peak / 1e9:.1f} GFLOP/s per rank. "
              f"MFU = achieved model FLOP/s / (matmul rate x ranks).{'' if cuda else ' CPU: only ratios count.'}\n")
    table = ["| config | params | tokens/step | tokens/s median [min, max] | MFU | mem MB | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r['config']} | {r['params_M']:.1f}M | {r['tokens_per_step']} | "
                     f"{r['tokens_per_s_median']:.0f} [{r['tokens_per_s_min']:.0f}, {r['tokens_per_s_max']:.0f}] | "
                     f"{r['mfu']:.2%} | {r['mem_mb']:.0f} | {r['final_loss']:.3f} |")
    text = header + "\n" + "\n".join(table) + "\n"
    print(text)
    doc = {"date": today(), "machine": host, "world_size": world, "matmul_flops_per_s": peak, "results": results}
    write_results(f"bench_train_{'gpu' if cuda else 'cpu'}", doc, text, args.out)


if __name__ == "__main__":
    main()
