"""dist.fault.cost against hand calculations for launch/llama3-8b-128k.toml on 8 H100s."""

import dataclasses
import os

import pytest

from dist.config import load_config
from dist.fault.codec import make_code
from dist.fault.cost import Bandwidths, blob_bytes, snapshot_cost, step_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Llama-3-8B by hand: untied embedding and head [128256, 4096], 32 layers of q, o [4096, 4096], k, v [1024, 4096],
# gate, up, down [14336, 4096] and two norms [4096], the final norm [4096]
LLAMA3_8B = 2 * 128256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096) + 4096


@pytest.fixture(scope="module")
def cfg():
    return load_config(os.path.join(ROOT, "launch", "llama3-8b-128k.toml"), [])


def test_blob_is_the_fsdp_shard_of_weights_and_adamw_state(cfg):
    assert LLAMA3_8B == 8_030_261_248
    n_tensors = 32 * 9 + 3
    # bf16 weights and AdamW m, v, sharded 8 ways; AdamW's fp32 step scalar per tensor
    assert blob_bytes(cfg, 8) == LLAMA3_8B // 8 * 2 * 3 + 4 * n_tensors


def test_step_time_dense_part(cfg):
    """Doubling the GEMM rate halves the dense part: 8 flops per parameter and token (full checkpointing)."""
    bw = Bandwidths()
    fast = dataclasses.replace(bw, gemm_flops=2 * bw.gemm_flops)
    dense = 2 * (step_time(cfg, 8, 8192, bw) - step_time(cfg, 8, 8192, fast))
    assert dense == pytest.approx(8 * LLAMA3_8B * 262144 / (8 * bw.gemm_flops), rel=1e-9)
    assert step_time(cfg, 8, 131072, bw) > step_time(cfg, 8, 8192, bw)  # attention grows with the sequence


def test_snapshot_cost_by_hand():
    bw = Bandwidths(pcie_d2h=25e9, hbm=3e12, host_mem=100e9, nic=50e9)
    code = make_code("xor", 4)  # k = 3 pieces, m = 1 parity block
    c = snapshot_cost(6e9, gpus_per_host=8, code=code, step_s=10.0, bw=bw)
    assert c["copy_s"] == pytest.approx(0.24)
    assert c["hbm_s"] == pytest.approx(0.002)
    assert c["host_s"] == pytest.approx(8 * 6e9 * (3 + 2 / 3) / 100e9)  # 1.76 s: fits in the step
    assert c["nic_s"] == pytest.approx(0.12)
    assert c["overhead"] == pytest.approx((0.002 + 0.12) / 10)
    # a step shorter than the copy and the host work: the rest of both is paid
    short = snapshot_cost(6e9, gpus_per_host=8, code=code, step_s=0.2, bw=bw)
    assert short["stall_s"] == pytest.approx((0.24 - 0.2) + (1.76 - 0.2))
    # no parity (one host): only the copy's HBM reads
    alone = snapshot_cost(6e9, gpus_per_host=8, code=make_code("none", 1), step_s=10.0, bw=bw)
    assert alone["overhead"] == pytest.approx(0.002 / 10)
