"""Attention kernel benchmark: dist.kernels against torch SDPA in the same run.

GPU (CUDA present): causal bf16 attention at 4K-128K tokens, head_dim 64 and 128: forward and
forward+backward TFLOP/s of the Triton kernels against SDPA's flash backend, plus the measured bf16
matmul rate (the forward target is >= 60% of it); paged decode GB/s against gathering the pages +
SDPA, and against the measured copy bandwidth of the GPU.
CPU: a small run of the torch path (ATen CPU flash + lse) against SDPA; only the ratios count.

    python benchmarks/bench_kernels.py                 # full run for the machine it finds
    python benchmarks/bench_kernels.py --quick         # smoke test (tiny shapes, 1 repeat)

Writes benchmarks/results/bench_kernels.json and benchmarks/results/bench_kernels_<date>.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, machine, today, write_results  # noqa: E402
from dist.kernels import attention_backward, attention_forward, decode_attention  # noqa: E402

def timeit(fn, warmup, repeats, cuda):
    """-> (median seconds, spread = (max - min) / median) over `repeats` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med


def attn_flops(batch, heads, seq, dim, causal):
    return 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)


def bench_attention(seq, dim, hidden, dtype, device, causal, warmup, repeats, backward):
    """Ours ([b, s, h, d]) vs SDPA ([b, h, s, d], flash backend on GPU), each in its natural layout."""
    cuda = device == "cuda"
    heads = max(1, hidden // dim)
    batch = 1
    q, k, v = (torch.randn(batch, seq, heads, dim, device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
    dout = torch.randn_like(q)
    flops = attn_flops(batch, heads, seq, dim, causal) * (3.5 if backward else 1.0)

    def ours():
        out, lse = attention_forward(q, k, v, causal=causal)
        if backward:
            attention_backward(dout, q, k, v, out, lse, causal=causal)

    def sdpa():
        ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if cuda else _null()
        with ctx:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            if backward:
                torch.autograd.grad(out, (qt, kt, vt), dout.transpose(1, 2))

    t_ours, s_ours = timeit(ours, warmup, repeats, cuda)
    t_ref, s_ref = timeit(sdpa, warmup, repeats, cuda)
    return dict(kind="fwd+bwd" if backward else "fwd", seq=seq, dim=dim, heads=heads, batch=batch,
                dtype=str(dtype).replace("torch.", ""), causal=causal,
                ours_s=t_ours, ours_spread=s_ours, sdpa_s=t_ref, sdpa_spread=s_ref,
                ours_tflops=flops / t_ours / 1e12, sdpa_tflops=flops / t_ref / 1e12, ratio=t_ref / t_ours)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bench_matmul(dtype, warmup, repeats, n=8192):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t, spread = timeit(lambda: a @ b, warmup, repeats, True)
    return dict(kind="matmul", n=n, tflops=2 * n ** 3 / t / 1e12, spread=spread)


def bench_copy(warmup, repeats, nbytes=2 << 30):
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t, spread = timeit(lambda: y.copy_(x), warmup, repeats, True)
    return dict(kind="copy", bytes=nbytes, GBps=2 * nbytes / t / 1e9, spread=spread)


def decode_peer(q, k_cache, v_cache, table, lens):
    """Peer: gather each sequence's pages into contiguous K/V, then torch SDPA (GQA) per sequence."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        pages = table[b, : -(-n // k_cache.shape[1])].long()
        k = k_cache[pages].flatten(0, 1)[:n].transpose(0, 1)  # [heads_kv, n, dim]
        v = v_cache[pages].flatten(0, 1)[:n].transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=True)[:, 0])
    return torch.stack(outs)


def bench_decode(context, batch, heads_q, heads_kv, dim, block_size, dtype, device, warmup, repeats):
    """decode_attention (auto backend: Triton on GPU, torch on CPU; value checks off as in a serving loop)
    vs gather + SDPA; GB/s of K/V read."""
    cuda = device == "cuda"
    pages = math.ceil(context / block_size)
    num_blocks = batch * pages
    k_cache = torch.randn(num_blocks, block_size, heads_kv, dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks, device=device).int().reshape(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads_q, dim, device=device, dtype=dtype)
    nbytes = 2 * batch * context * heads_kv * dim * k_cache.element_size()
    out = decode_attention(q, k_cache, v_cache, table, lens)
    ref = decode_peer(q, k_cache, v_cache, table, lens)
    max_err = (out.float() - ref.float()).abs().max().item()
    t_ours, s_ours = timeit(lambda: decode_attention(q, k_cache, v_cache, table, lens, check_values=False),
                            warmup, repeats, cuda)
    t_ref, s_ref = timeit(lambda: decode_peer(q, k_cache, v_cache, table, lens), warmup, repeats, cuda)
    return dict(kind="decode", context=context, batch=batch, heads_q=heads_q, heads_kv=heads_kv, dim=dim,
                block_size=block_size, dtype=str(dtype).replace("torch.", ""), bytes=nbytes, max_abs_err=max_err,
                ours_s=t_ours, ours_spread=s_ours, peer_s=t_ref, peer_spread=s_ref,
                ours_GBps=nbytes / t_ours / 1e9, peer_GBps=nbytes / t_ref / 1e9, ratio=t_ref / t_ours)


def run(args):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows, refs = [], {}
    if cuda:
        dtype = torch.bfloat16
        seqs = [4096, 8192, 16384, 32768, 65536, 131072]
        seqs = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else seqs
        dims = [int(d) for d in args.head_dims.split(",")]
        refs["matmul"] = bench_matmul(dtype, args.warmup, args.repeats)
        refs["copy"] = bench_copy(args.warmup, args.repeats)
        contexts, decode_batch = [131072], 1
        hidden = 2048
    else:
        dtype = torch.float32
        seqs = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else [512, 2048]
        dims = [int(d) for d in args.head_dims.split(",")]
        contexts, decode_batch = [8192], 4
        hidden = 512
    if args.quick:
        seqs, dims, contexts = seqs[:1], dims[:1], [min(contexts[0], 1024)]
    for seq in seqs:
        for dim in dims:
            for backward in (False, True):
                r = bench_attention(seq, dim, hidden, dtype, device, True, args.warmup, args.repeats, backward)
                rows.append(r)
                print(f"{r['kind']:8s} seq={seq:6d} d={dim:3d}  ours {r['ours_s'] * 1e3:9.3f} ms "
                      f"({r['ours_tflops']:7.2f} TFLOP/s)  sdpa {r['sdpa_s'] * 1e3:9.3f} ms  ratio {r['ratio']:.2f}x",
                      flush=True)
    for context in contexts:
        r = bench_decode(context, decode_batch, 32, 8, 128, 16, dtype, device, args.warmup, args.repeats)
        rows.append(r)
        print(f"decode   ctx={context:6d} ours {r['ours_s'] * 1e3:8.3f} ms ({r['ours_GBps']:7.1f} GB/s)  "
              f"gather+SDPA {r['peer_s'] * 1e3:8.3f} ms  ratio {r['ratio']:.2f}x  max err {r['max_abs_err']:.1e}",
              flush=True)
    threads = "" if cuda else f", {torch.get_num_threads()} threads"
    return dict(machine=machine() + threads, device=device, torch=torch.__version__, date=today(),
                quick=args.quick, warmup=args.warmup, repeats=args.repeats, references=refs, rows=rows)


def markdown(res):
    lines = [f"# bench_kernels — {res['date']}", "", f"Machine: {res['machine']}; "
             f"warm-up {res['warmup']}, repeats {res['repeats']}, median; spread = (max-min)/median."
             + (" QUICK SMOKE RUN, not a measurement." if res["quick"] else ""), ""]
    refs = res["references"]
    if refs:
        lines += [f"Measured peers: bf16 matmul {refs['matmul']['tflops']:.1f} TFLOP/s; "
                  f"device copy {refs['copy']['GBps']:.0f} GB/s.", ""]
    lines += ["| kind | seq | dim | heads | ours ms | ours TFLOP/s | SDPA ms | SDPA TFLOP/s | SDPA/ours "
              "| spread ours/SDPA |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] in ("fwd", "fwd+bwd"):
            lines.append(f"| {r['kind']} | {r['seq']} | {r['dim']} | {r['heads']} | {r['ours_s'] * 1e3:.3f} | "
                         f"{r['ours_tflops']:.2f} | {r['sdpa_s'] * 1e3:.3f} | {r['sdpa_tflops']:.2f} | "
                         f"{r['ratio']:.2f}x | {r['ours_spread']:.2f}/{r['sdpa_spread']:.2f} |")
    lines += ["", "| decode context | batch | heads q/kv | dim | ours ms | ours GB/s | gather+SDPA ms | peer GB/s "
              "| peer/ours |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] == "decode":
            lines.append(f"| {r['context']} | {r['batch']} | {r['heads_q']}/{r['heads_kv']} | {r['dim']} | "
                         f"{r['ours_s'] * 1e3:.3f} | {r['ours_GBps']:.1f} | {r['peer_s'] * 1e3:.3f} | "
                         f"{r['peer_GBps']:.1f} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: smallest shape, few repeats")
    ap.add_argument("--seq-lens", default="", help="comma list of tokens per sequence")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 2
    res = run(args)
    md = markdown(res)
    write_results("bench_kernels", res, md, args.out_dir)
    print(md)


if __name__ == "__main__":
    main()
