"""What every-step snapshots cost a GPU job: a model from stated bandwidths, for jobs this machine cannot run.

    bw = Bandwidths()                                   # H100 SXM host, every figure stated below
    step = step_time(cfg, world_size, seq_len)          # seconds of one training step (dist.sim + dense GEMMs)
    cost = snapshot_cost(blob_bytes(cfg, world_size), gpus_per_host=8, code=make_code("xor", 4),
                         step_s=step, bw=bw)
    cost["overhead"]                                    # fraction of the step the snapshots add

Every part of a snapshot runs beside the next step: the device-to-host copy
on a side CUDA stream, the checksum and parity on host CPU threads, the
parity pieces over the NIC. What the step pays:
- the HBM reads of the copy, taken from the kernels (blob / HBM bandwidth);
- the parity bytes on the NIC, charged in full as if each delayed the
  training's own inter-host traffic (m x blob per GPU each way);
- any part that does not fit in one step (the next snapshot waits for it):
  max(0, copy - step) for PCIe, max(0, host work - step) for host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist.fault.codec import Code


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second. Defaults: one H100 SXM node of 8 GPUs, each with its own PCIe Gen5 x16 link and a
    400 Gb/s NIC, a dual-socket host."""

    pcie_d2h: float = 25e9    # per GPU, device -> pinned host memory; PCIe Gen5 x16 is 64 GB/s nominal, taken
    #                           at 40% for 8 GPUs sharing PCIe switches and the host's memory
    hbm: float = 3.35e12      # per GPU, H100 SXM HBM3: what the copy's reads take from the kernels
    host_mem: float = 100e9   # per host, for checksum and parity (2 sockets of DDR5 give ~600 GB/s peak;
    #                           a sixth, as the CPU threads doing it reach)
    nic: float = 46e9         # per GPU, InfiniBand NDR 400 Gb/s, one NIC per GPU (dist.sim's ib-400)
    gemm_flops: float = 989e12 * 0.45  # per GPU, dense bf16 matmuls at 45% of H100 SXM's 989 TFLOP/s


def blob_bytes(cfg, world_size: int) -> int:
    """One rank's snapshot: its shard of the weights and optimizer state, by dist.memory's estimate of the
    engine's static memory (gradients and gathered layers are not saved)."""
    from dist.memory import estimate

    static = estimate(cfg, world_size, device_bytes=0).static
    return sum(v for k, v in static.items() if k.startswith(("weights", "optimizer")))


def step_time(cfg, world_size: int, seq_len: int, bw: Bandwidths = Bandwidths()) -> float:
    """Seconds of one training step of `cfg` on `world_size` H100s, every sequence `seq_len` tokens: dense
    matmuls (6 flops per parameter and token, 8 with full activation checkpointing's recompute) at
    bw.gemm_flops, plus attention as dist.sim predicts it for cfg.sp.strategy over NVLink."""
    from dist.memory import model_config, param_shapes
    from dist.sim.model import COMPUTE_PROFILES, LINK_PROFILES, Workload, predict

    m = model_config(cfg)
    n_params = sum(math.prod(s) for s in param_shapes(m))
    tokens = cfg.data.tokens_per_step
    dp = world_size // cfg.sp.degree
    flops_per = 8 if cfg.train.activation_checkpointing == "full" else 6
    dense_s = flops_per * n_params * tokens / (world_size * bw.gemm_flops)
    sequences = tokens / seq_len / dp  # per SP group, one after another
    w = Workload(batch=1, local_seq=seq_len // cfg.sp.degree, heads_q=m.n_heads, heads_kv=m.n_kv_heads,
                 head_dim=m.dim // m.n_heads, world=cfg.sp.degree, layout=cfg.sp.layout)
    strategy = cfg.sp.strategy if cfg.sp.degree > 1 else "allgather"
    attn = predict(strategy, w, LINK_PROFILES["nvlink-h100"], COMPUTE_PROFILES["h100-bf16"])
    recompute = attn.fwd_s if cfg.train.activation_checkpointing == "full" else 0.0
    return dense_s + sequences * m.n_layers * (attn.total_s + recompute)


def snapshot_cost(blob: int, *, gpus_per_host: int, code: Code, step_s: float,
                  bw: Bandwidths = Bandwidths()) -> dict:
    """Seconds of each part of one snapshot per step and the fraction of `step_s` it adds (module doc)."""
    k, m = code.k, code.m
    copy_s = blob / bw.pcie_d2h
    hbm_s = blob / bw.hbm
    # per GPU's blob on the host: the DMA write, the checksum's read, the encode's read of k pieces
    # (the blob), the m/k parity written and checksummed
    host_bytes = gpus_per_host * blob * (3 + (2 * m / k if m else 0))
    host_s = host_bytes / bw.host_mem
    nic_s = m * blob / bw.nic
    stall_s = max(0.0, copy_s - step_s) + max(0.0, host_s - step_s)
    added = hbm_s + nic_s + stall_s
    return {"blob_bytes": blob, "copy_s": copy_s, "hbm_s": hbm_s, "host_s": host_s, "nic_s": nic_s,
            "stall_s": stall_s, "added_s": added, "step_s": step_s, "overhead": added / step_s}
