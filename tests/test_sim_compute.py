"""dist.sim's compute terms against independent references: the tiles a causal block costs (a brute
force over the tile grid), the probe's fit (timings made from a known device), and the merges the
model charges per rank (counted in the ring strategies as they run)."""

from __future__ import annotations

import pytest

from benchmarks import bench_model
from dist.sim import KERNEL_TILES, ComputeProfile, Workload, schedule
from dist.sim.model import causal_pairs, tiled_pairs


def _brute_tiled(rows, cols, tile_q, tile_k):
    """Pairs a tiled kernel computes: every tile holding a visible pair (j <= i), whole."""
    total = 0
    for q0 in range(0, rows, tile_q):
        for k0 in range(0, cols, tile_k):
            q1, k1 = min(rows, q0 + tile_q), min(cols, k0 + tile_k)
            if any(j <= i for i in range(q0, q1) for j in range(k0, k1)):
                total += (q1 - q0) * (k1 - k0)
    return total


@pytest.mark.parametrize("rows, cols, tile_q, tile_k", [
    (96, 96, 16, 32), (96, 80, 16, 32), (100, 100, 32, 16), (70, 130, 8, 24), (64, 64, 64, 64), (33, 47, 1, 1)])
def test_tiled_pairs_match_a_brute_force_over_the_tile_grid(rows, cols, tile_q, tile_k):
    assert tiled_pairs(rows, cols, tile_q, tile_k) == _brute_tiled(rows, cols, tile_q, tile_k)
    exact = sum(1 for i in range(rows) for j in range(cols) if j <= i)
    assert causal_pairs(rows, cols) == exact == tiled_pairs(rows, cols, 1, 1)


def test_a_causal_block_within_one_key_tile_costs_a_full_block():
    """ATen's CPU kernel (keys in tiles of 512): a causal 384 x 384 block computes every pair, a
    2048 x 2048 one 5/8 of them (1/2 + 1/8: the diagonal tiles whole)."""
    cpu = ComputeProfile("cpu", 1.0, 1.0, tile_q=KERNEL_TILES["cpu"][0], tile_k=KERNEL_TILES["cpu"][1])
    for n, share in ((384, 1.0), (2048, 5 / 8)):
        w = Workload(1, n, 4, 4, 16, 1, True, "contiguous", 4)
        full = w.part_flops(0, 0, n, False)
        assert cpu.kernel_flops(w.part_flops(0, 0, n, True), n, n, True) == pytest.approx(share * full)
        assert cpu.kernel_flops(full, n, n, False) == full


def test_probe_fit_recovers_a_known_device():
    """Timings made from a known device (rates, call cost, tiles by brute force, element-wise rate),
    two probing ranks with the same figures: fit_compute gives them back."""
    class Args:
        heads, kv_heads, head_dim = 4, 4, 16

    fwd, bwd, call, mem = 50e9, 40e9, 2e-4, 20e9
    tq, tk = KERNEL_TILES["cpu"]
    rows = []
    for n in (64, 256, 640, 1024):
        w = Workload(1, n, 4, 4, 16, 1, True, "contiguous", 4)
        for causal in (False, True):
            pairs = _brute_tiled(n, n, tq, tk) if causal else n * n
            work = 4 * 4 * 16 * pairs
            rows.append(dict(kind="kernel", rows=n, causal=causal, flops=w.part_flops(0, 0, n, causal),
                             fwd_s=call + work / fwd, bwd_s=call + 2.5 * work / bwd))
        rows.append(dict(kind="merge", rows=n, bytes=w.merge_bytes(n), s=w.merge_bytes(n) / mem))
    profile, _ = bench_model.fit_compute([rows, rows], Args())
    assert profile.fwd_flops == pytest.approx(fwd, rel=1e-6) and profile.bwd_flops == pytest.approx(bwd, rel=1e-6)
    assert profile.call_s == pytest.approx(call, rel=1e-6) and profile.mem_Bps == pytest.approx(mem, rel=1e-9)
    assert (profile.tile_q, profile.tile_k, profile.basis) == (tq, tk, "measured")


def _count_merges(rank, world, n):
    """Rows each partial-output merge of a strategy's forward folds in, counted as it runs, per strategy."""
    import torch

    from dist.ringattn import ring_attention, strategies

    merged = []
    real = strategies.merge_attention

    def counting(out, lse, block_out, block_lse, **kw):
        merged.append(block_out.shape[1])
        return real(out, lse, block_out, block_lse, **kw)

    strategies.merge_attention = counting
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, n, 2, 8, generator=g) for _ in range(3))
    counts = {}
    for strategy in ("tokenring", "ring", "allgather"):
        merged.clear()
        ring_attention(q, k, v, causal=True, strategy=strategy, layout="zigzag")
        counts[strategy] = sum(merged)
    return counts


def test_merges_the_model_charges_are_the_ones_the_strategies_run():
    """The model's element-wise bytes of a forward pass, per rank, are those of the merges the
    implementation makes (P = 3, zigzag, causal; TokenRing's CPU diagonal split included)."""
    from dist.plan import diag_tail
    from tests.multirank import run_ranks

    p, n = 3, 48
    counted = run_ranks(_count_merges, p, n, timeout_s=120)
    w = Workload(1, n, 2, 2, 8, p, True, "zigzag", 4, diag_tail=diag_tail("cpu"))
    for strategy in ("tokenring", "ring", "allgather"):
        modelled = [sum(s.moved[r] for s in schedule(strategy, w, False)) / w.merge_bytes(1) for r in range(p)]
        assert modelled == [c[strategy] for c in counted] and sum(modelled) > 0, strategy
