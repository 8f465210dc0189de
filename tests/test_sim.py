"""dist.sim: link profiles, bytes, the modelled targets, strategy choice, the where-each-wins report."""

from __future__ import annotations

import json

import pytest

from dist.sim import (COMPUTE_PROFILES, LINK_PROFILES, Workload, bytes_per_rank, choose_strategy, load_link_profiles,
                      predict, where_each_wins)

H100 = COMPUTE_PROFILES["h100-bf16"]


def test_builtin_and_loaded_profiles(tmp_path):
    for name in ("nvlink-h100", "pcie-gen4", "pcie-gen5", "ib-200", "ib-400"):
        assert LINK_PROFILES[name].bandwidth_Bps > 0
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"profiles": [
        {"name": "veth-1g", "bandwidth_Bps": 1.2e8, "latency_s": 1e-4, "duplex": 0.9, "alltoall_Bps": 1e8,
         "group_size": 2, "source": "measured"},
        {"name": "plain", "bandwidth_Bps": 1e9, "latency_s": 1e-5}]}))
    links = load_link_profiles(path)
    assert links["veth-1g"].duplex == 0.9 and links["veth-1g"].alltoall_Bps == 1e8
    assert links["plain"].duplex == 1.0 and links["plain"].alltoall_Bps is None
    path.write_text(json.dumps({"profiles": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="bandwidth_Bps"):
        load_link_profiles(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="profiles"):
        load_link_profiles(path)


def test_ring_and_allgather_bytes_closed_form():
    w = Workload(2, 64, 8, 2, 16, 4, True, "zigzag", itemsize=2)
    kv = 64 * 2 * 2 * 2 * 16 * 2  # tokens * batch * (k, v) * heads_kv * dim * bytes
    assert bytes_per_rank("ring", w, backward=False) == [3 * kv] * 4
    assert bytes_per_rank("ring", w, backward=True) == [3 * kv + 4 * 2 * kv] * 4  # dK/dV in fp32, P hops
    assert bytes_per_rank("allgather", w) == [3 * kv + 3 * 2 * kv] * 4


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("gqa", [1, 8])
def test_tokenring_hides_communication_on_nvlink_at_32k_tokens(world, gqa):
    """Target: modelled TokenRing step time within 5% of compute-only at >= 32K tokens per GPU on NVLink."""
    for tokens in (32768, 131072):
        w = Workload(1, tokens, 32, 32 // gqa, 128, world, True, "zigzag", itemsize=2)
        p = predict("tokenring", w, LINK_PROFILES["nvlink-h100"], H100)
        assert p.total_s <= 1.05 * p.compute_s, (tokens, p)


@pytest.mark.parametrize("world", [2, 4])
def test_tokenring_beats_kv_ring_where_communication_dominates(world):
    """Target: >= 1.5x faster than the KV ring on PCIe when communication dominates (MHA, 4K tokens/GPU)."""
    w = Workload(1, 4096, 32, 32, 128, world, True, "zigzag", itemsize=2)
    link = LINK_PROFILES["pcie-gen4"]
    tr, ring = predict("tokenring", w, link, H100), predict("ring", w, link, H100)
    assert tr.total_s > 1.5 * tr.compute_s  # communication dominates
    assert ring.total_s >= 1.5 * tr.total_s


def test_choose_strategy_follows_bytes_under_gqa():
    link = LINK_PROFILES["pcie-gen4"]
    # MHA: Q + out is less than K + V twice -> tokenring; GQA 8: K/V are small -> ring or allgather
    assert choose_strategy((1, 4096, 32, 128), (1, 4096, 32, 128), 4, itemsize=2, link=link, compute=H100) == "tokenring"
    assert choose_strategy((1, 4096, 32, 128), (1, 4096, 4, 128), 4, itemsize=2, link=link,
                           compute=H100) in ("ring", "allgather")
    assert choose_strategy((1, 16, 2, 8), (1, 16, 2, 8), 1) == "tokenring"


def test_where_each_wins_report(capsys):
    rows = where_each_wins(worlds=(2,), tokens_per_rank=(4096, 32768), gqa=(1, 8))
    assert {r["best"] for r in rows} <= {"tokenring", "ring", "allgather", "ulysses"}
    assert len(rows) == 5 * 2 * 2
    for r in rows:
        assert r["best"] == min(("tokenring", "ring", "allgather", "ulysses"), key=lambda s: r[f"{s}_ms"])
    from dist.sim.__main__ import main

    main(["--worlds", "2", "--tokens", "4096"])
    out = capsys.readouterr().out
    assert "nvlink-h100" in out and "best" in out


def test_compute_shared_by_ranks_on_fewer_cores():
    from dist.sim import COMPUTE_PROFILES

    cpu = COMPUTE_PROFILES["cpu-1-thread"]
    assert cpu.shared(2, 2) is cpu
    half = cpu.shared(4, 2)
    assert half.fwd_flops == cpu.fwd_flops / 2 and half.bwd_flops == cpu.bwd_flops / 2
