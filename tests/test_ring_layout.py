"""Layouts: shard/unshard round trips, shard positions, and the block plan against a brute-force mask."""

from __future__ import annotations

import pytest
import torch

from dist.ringattn import block, shard, shard_positions, unshard_list, zigzag_positions


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [shard(x, 1, r, world, layout) for r in range(world)]
    assert all(s.shape == (2, 24 // world, 3) for s in shards)
    assert torch.equal(unshard_list(shards, 1, layout), x)
    # the positions of a shard are the tokens it holds
    for r in range(world):
        assert torch.equal(shards[r][0, :, 0] // 3, shard_positions(24, r, world, layout))


def test_zigzag_positions_example():
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert shard_positions(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]


def test_indivisible_lengths_raise():
    with pytest.raises(ValueError, match="divisible by 6"):
        shard(torch.zeros(1, 8), 1, 0, 3, "zigzag")
    with pytest.raises(ValueError, match="divisible by 3"):
        shard(torch.zeros(1, 8), 1, 0, 3, "contiguous")
    with pytest.raises(ValueError, match="layout"):
        shard(torch.zeros(1, 8), 1, 0, 2, "spiral")
    with pytest.raises(ValueError, match="rank"):
        shard(torch.zeros(1, 8), 1, 2, 2, "zigzag")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_blocks_cover_exactly_the_mask(layout, causal, world):
    """Union over (a, b) of block(a, b) == the global (causal) mask, each pair once."""
    seq = 4 * world
    n = seq // world
    pos = [shard_positions(seq, r, world, layout) for r in range(world)]
    covered = torch.zeros(seq, seq, dtype=torch.int64)
    for a in range(world):
        for b in range(world):
            blk = block(a, b, n, layout, causal)
            if blk is None:
                continue
            for i in range(blk.q_start, n):
                for j in range(blk.k_start, blk.k_stop):
                    if blk.causal and j > i:
                        continue
                    covered[pos[a][i], pos[b][j]] += 1
    expected = torch.ones(seq, seq, dtype=torch.int64)
    if causal:
        expected = expected.tril()
    assert torch.equal(covered, expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tail", [0.0, 0.125, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 8, 9])
def test_diag_parts_cover_the_local_block_once(n, tail, causal):
    """The parts of a rank's own block, each top-left causal (offset 0) or unmasked, cover its mask once."""
    from dist.ringattn import diag_parts

    covered = torch.zeros(n, n, dtype=torch.int64)
    parts = diag_parts(n, causal, tail)
    assert len(parts) == (2 if 0 < n - round(tail * n) < n else 1)
    for q0, k0, k1 in parts:
        for i in range(q0, n):
            for j in range(k0, k1):
                if not causal or j - k0 <= i - q0:  # top-left causal relative to the part's corner
                    covered[i, j] += 1
    expected = torch.ones(n, n, dtype=torch.int64)
    assert torch.equal(covered, expected.tril() if causal else expected)
