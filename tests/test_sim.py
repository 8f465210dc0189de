"""dist.sim: link profiles, bytes, the modelled targets, strategy choice, the where-each-wins report."""

from __future__ import annotations

import json

import pytest
import torch

from dist.sim import (COMPUTE_PROFILES, LINK_PROFILES, ComputeProfile, LinkProfile, Workload, bytes_per_rank, choose_strategy,
                      load_link_profiles, predict, schedule, where_each_wins)

H100 = COMPUTE_PROFILES["h100-bf16"]


def test_builtin_and_loaded_profiles(tmp_path):
    for name in ("nvlink-h100", "pcie-gen4", "pcie-gen5", "ib-200", "ib-400"):
        assert LINK_PROFILES[name].bandwidth_Bps > 0
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"profiles": [
        {"name": "veth-1g", "bandwidth_Bps": 1.2e8, "latency_s": 1e-4, "duplex": 0.9, "alltoall_Bps": 1e8,
         "group_size": 2, "source": "measured", "per_peer": True, "allgather_Bps": 9e7,
         "rate_while_computing": 0.5, "cpu_s_per_byte": 2e-9},  # fields of older probes: left aside
        {"name": "plain", "bandwidth_Bps": 1e9, "latency_s": 1e-5}]}))
    links = load_link_profiles(path)
    assert links["veth-1g"].duplex == 0.9 and links["veth-1g"].alltoall_Bps == 1e8
    assert links["veth-1g"].per_peer
    assert links["veth-1g"].allgather_Bps == 9e7 and links["plain"].allgather_Bps is None
    assert links["plain"].duplex == 1.0 and links["plain"].alltoall_Bps is None
    assert not links["plain"].per_peer
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


def test_transfer_charges_duplex_only_while_both_directions_carry():
    """A rank that sends 2 MB and receives 1 MB: 1 MB each way at the duplex rate, then 1 MB one way at
    the full rate (TokenRing's zigzag steps at P = 2 are this lopsided)."""
    link = LinkProfile("half", 1e6, 1e-3, duplex=0.5)
    assert link.transfer_s(2e6, 1e6, 2) == pytest.approx(2e-3 + 1e6 / 0.5e6 + 1e6 / 1e6)
    assert link.transfer_s(1e6, 1e6, 1) == pytest.approx(1e-3 + 2.0)
    assert link.transfer_s(1e6, 0, 1) == pytest.approx(1e-3 + 1.0)


def test_allgather_rides_the_ring_rate_and_dkv_the_alltoall_rate():
    """gloo's all-gather is a ring (each rank sends to next): at P > 2 it moves at the link's shift
    rate (at P = 2 both directions share one connection, like an all-to-all); the backward's
    reduce-scatter is an all_to_all, at the all-to-all rate."""
    w = Workload(1, 1024, 8, 8, 64, 4, True, "zigzag", 4)
    fast, slow_a2a = LinkProfile("a", 1e8, 0.0, 1.0, 1e8), LinkProfile("b", 1e8, 0.0, 1.0, 1e7)
    cpu = COMPUTE_PROFILES["cpu-1-thread"]
    pa, pb = predict("allgather", w, fast, cpu), predict("allgather", w, slow_a2a, cpu)
    assert pa.fwd_s == pytest.approx(pb.fwd_s)
    assert pb.bwd_s > pa.bwd_s
    kv = 1024 * 2 * 8 * 64 * 4  # one rank's K and V, fp32
    compute_fwd = predict("allgather", w, LinkProfile("free", 1e18, 0.0), cpu).fwd_s
    assert pa.fwd_s - compute_fwd == pytest.approx(3 * kv / 1e8, rel=1e-6)
    w2 = Workload(1, 1024, 8, 8, 64, 2, True, "zigzag", 4)
    assert predict("allgather", w2, slow_a2a, cpu).fwd_s > predict("allgather", w2, fast, cpu).fwd_s


def test_ulysses_moves_qkv_in_one_all_to_all_at_the_one_rate():
    """Ulysses: one all-to-all of q, k, v packed and one of the output forward (dO, then dq, dk, dv
    backward), each (P-1)/P of the rank's rows at the all-to-all rate plus one latency; the
    attention between them on 1/P of the heads over the whole sequence."""
    w = Workload(1, 1024, 8, 8, 64, 4, True, "zigzag", 4)
    cpu = ComputeProfile("flops only", 43e9, 43e9)  # no call cost, tiles or element-wise passes
    link = LinkProfile("l", 1e8, 1e-4, 1.0, 1e7)
    row = 1024 * 8 * 64 * 4 * 3 / 4                 # one tensor's bytes leaving a rank
    colls = [(s.sent[0], s.messages[0]) for s in schedule("ulysses", w, False) if not s.overlapped]
    assert colls == [(3 * row, 1), (row, 1)]
    assert [s.sent[0] for s in schedule("ulysses", w, True) if not s.overlapped] == [row, 3 * row]
    pred = predict("ulysses", w, link, cpu)
    assert pred.fwd_s - pred.compute_s / 3.5 == pytest.approx(2e-4 + 4 * row / 1e7, rel=1e-6)
    full = 4.0 * 8 * 64 * 4096 * 4097 / 2 / 4  # causal flops of the whole sequence on 8/4 heads
    assert pred.compute_s == pytest.approx(3.5 * full / 43e9, rel=1e-9)


def test_auto_considers_ulysses_where_heads_divide():
    """sp_attention's "auto" adds Ulysses to the candidates; on PCIe at 4K tokens per GPU with MHA over
    4 ranks the model prefers it, and a ring strategy when heads do not divide the group."""
    link = LINK_PROFILES["pcie-gen4"]
    cands = ("tokenring", "ring", "allgather", "ulysses")
    mha = dict(itemsize=2, link=link, compute=H100, candidates=cands)
    assert choose_strategy((1, 4096, 32, 128), (1, 4096, 32, 128), 4, **mha) == "ulysses"
    assert choose_strategy((1, 4096, 32, 128), (1, 4096, 32, 128), 4, itemsize=2, link=link,
                           compute=H100) == "tokenring"  # ring strategies only (ring_attention's auto)
    # long sequences: TokenRing hides its messages behind compute, Ulysses' all-to-alls wait
    assert choose_strategy((1, 131072, 32, 128), (1, 131072, 32, 128), 4, **mha) == "tokenring"


def _auto_pick(rank, world):
    from dist.seqpar.wrap import _auto

    every = ("tokenring", "ring", "allgather", "ulysses")
    q = torch.zeros(1, 64, 4, 8)
    picks = (_auto(q, torch.zeros(1, 64, 4, 8), True, None, "zigzag"),
             _auto(q, torch.zeros(1, 64, 1, 8), True, None, "zigzag"))
    # the model's own picks in this rank's state (its cluster is set per process)
    expected = (choose_strategy((1, 64, 4, 8), (1, 64, 4, 8), 2, itemsize=4, candidates=every),
                choose_strategy((1, 64, 4, 8), (1, 64, 1, 8), 2, itemsize=4, candidates=every[:3]))
    return picks, expected


def test_sp_auto_never_picks_ulysses_when_kv_heads_do_not_divide():
    from tests.multirank import run_ranks

    out = run_ranks(_auto_pick, 2, timeout_s=60)
    assert out[0] == out[1]  # the same on every rank
    for picks, (expected, ring_only) in out:
        assert picks[0] == expected  # the model's pick among all four
        assert picks[1] == ring_only != "ulysses"  # 1 K/V head over 2 ranks: a ring strategy


def test_per_peer_links_carry_messages_to_different_peers_at_once():
    """On a mesh (a link per pair) the KV ring, which talks to one peer per direction, costs the same
    as behind one NIC; TokenRing at P >= 3 sends Q to prev and results to their owner in one step,
    which separate links carry at once."""
    from dataclasses import replace

    w = Workload(1, 4096, 32, 32, 128, 4, True, "zigzag", 2)
    nic = LinkProfile("nic", 1e9, 1e-5, 1.0)
    mesh = replace(nic, name="mesh", per_peer=True)
    assert predict("ring", w, mesh, H100).total_s == pytest.approx(predict("ring", w, nic, H100).total_s)
    assert predict("tokenring", w, mesh, H100).total_s < 0.9 * predict("tokenring", w, nic, H100).total_s


def test_allgather_on_per_peer_links_pays_no_duplex():
    """A ring all-gather (P > 2) sends to next and receives from prev: on a mesh those are two links,
    so a half-duplex figure of one link does not slow it; through one NIC it does."""
    from dataclasses import replace

    w = Workload(1, 1024, 8, 8, 64, 4, True, "zigzag", 4)
    nic = LinkProfile("nic", 1e8, 0.0, 0.5, 1e8)
    mesh = replace(nic, per_peer=True)
    cpu = COMPUTE_PROFILES["cpu-1-thread"]
    free = predict("allgather", w, LinkProfile("free", 1e18, 0.0), cpu).fwd_s
    kv = 1024 * 2 * 8 * 64 * 4
    assert predict("allgather", w, mesh, cpu).fwd_s - free == pytest.approx(3 * kv / 1e8, rel=1e-6)
    assert predict("allgather", w, nic, cpu).fwd_s - free == pytest.approx(3 * kv / 0.5e8, rel=1e-6)


def test_measured_allgather_rate_replaces_the_ring_estimate():
    """A profile that carries the backend's measured all-gather rate (bench_links' allgather pattern) is
    charged that rate for the KV all-gather, whatever its shift rate and duplex say; the backward's
    all_to_all is unaffected."""
    from dataclasses import replace

    w = Workload(1, 1024, 8, 8, 64, 4, True, "zigzag", 4)
    nic = LinkProfile("nic", 1e8, 1e-4, 0.5, 1e8)
    measured = replace(nic, allgather_Bps=2e7)
    cpu = COMPUTE_PROFILES["cpu-1-thread"]
    free = predict("allgather", w, LinkProfile("free", 1e18, 0.0), cpu).fwd_s
    kv = 1024 * 2 * 8 * 64 * 4
    assert predict("allgather", w, measured, cpu).fwd_s - free == pytest.approx(3 * 1e-4 + 3 * kv / 2e7, rel=1e-6)
    assert predict("allgather", w, measured, cpu).bwd_s == pytest.approx(predict("allgather", w, nic, cpu).bwd_s)


def test_profile_flags_are_checked(tmp_path):
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"profiles": [{"name": "x", "bandwidth_Bps": 1e9, "latency_s": 0, "per_peer": "no"}]}))
    with pytest.raises(ValueError, match="per_peer"):
        load_link_profiles(path)
    path.write_text(json.dumps({"profiles": [{"name": "x", "bandwidth_Bps": "lots", "latency_s": 0}]}))
    with pytest.raises(ValueError, match="profile 0"):
        load_link_profiles(path)
    path.write_text(json.dumps({"profiles": [{"name": "x", "bandwidth_Bps": 1e9, "latency_s": 0, "duplex": 1.5}]}))
    with pytest.raises(ValueError, match="duplex"):
        load_link_profiles(path)


def test_kernel_calls_pay_a_fixed_cost_each():
    """A measured profile's call_s is charged once per kernel call of a rank's step: the KV ring at P=4
    (zigzag, causal) runs one block per step, 4 steps, forward and backward; all-gather one per
    visible block (4 as well); Ulysses one call on the whole sequence each way."""
    w = Workload(1, 256, 4, 4, 32, 4, True, "zigzag", 4)
    free = LinkProfile("free", 1e18, 0.0)
    base = ComputeProfile("k", 1e9, 1e9, basis="measured")
    slow = ComputeProfile("k", 1e9, 1e9, call_s=1e-3, basis="measured")
    for strategy, calls in (("ring", 8), ("allgather", 8), ("ulysses", 2)):
        extra = predict(strategy, w, free, slow).compute_s - predict(strategy, w, free, base).compute_s
        assert extra == pytest.approx(calls * 1e-3, rel=1e-9), strategy
    with pytest.raises(ValueError, match="basis"):
        ComputeProfile("k", 1e9, 1e9, basis="guess")
    assert H100.basis == "flops" and "35%" in H100.source  # the peak and efficiency are stated


def test_cluster_charges_the_link_by_where_the_ranks_are():
    """4 GPUs a node: ranks 0-3 share NVLink, ranks 2-5 span two nodes and ride InfiniBand; the "auto"
    policy then sees the slower link (MHA at 4K tokens per GPU: on NVLink every message hides and
    the KV ring, with one diagonal kernel call, is the cheapest; on InfiniBand TokenRing, whose
    messages both directions of the links carry)."""
    from dist.sim import Cluster, cluster, default_cluster, set_cluster

    c = Cluster(4, LINK_PROFILES["nvlink-h100"], LINK_PROFILES["ib-200"])
    assert c.link([0, 1, 2, 3]) is LINK_PROFILES["nvlink-h100"]
    assert c.link([2, 3, 4, 5]) is LINK_PROFILES["ib-200"] and c.nodes([2, 3, 4, 5]) == 2
    assert Cluster(None, c.intra, c.inter).link([0, 99]) is c.intra  # ranks per node unknown: one node
    q, k = (1, 4096, 32, 128), (1, 4096, 32, 128)
    ranks_in, ranks_across = [0, 1, 2, 3], [2, 3, 4, 5]
    expect_in = choose_strategy(q, k, 4, itemsize=2, device_type="cuda", link=LINK_PROFILES["nvlink-h100"])
    expect_across = choose_strategy(q, k, 4, itemsize=2, device_type="cuda", link=LINK_PROFILES["ib-200"])
    assert (expect_in, expect_across) == ("ring", "tokenring")
    set_cluster(c)
    try:
        assert cluster("cuda") is c
        assert choose_strategy(q, k, ranks_in, itemsize=2, device_type="cuda") == expect_in
        assert choose_strategy(q, k, ranks_across, itemsize=2, device_type="cuda") == expect_across
    finally:
        set_cluster(None)
    assert cluster("cuda") == default_cluster("cuda")  # one node of NVLink: what a plain script gets
    assert default_cluster("cpu", 2).link([1, 2]).name == "tcp-10g"
    with pytest.raises(ValueError, match="link profile"):
        default_cluster("cuda", 8, intra="nvlink-9000")


def test_config_names_the_links_and_runtime_sets_the_cluster():
    from dist.config import ConfigError, load_config
    from dist.runtime import Runtime
    from dist.sim import cluster, set_cluster

    with pytest.raises(ConfigError, match="runtime.inter_node_link"):
        load_config(None, ["runtime.inter_node_link=ib-9000"])
    cfg = load_config(None, ["runtime.intra_node_link=pcie-gen4", "runtime.inter_node_link=ib-200"])
    try:
        with Runtime.start(cfg):
            c = cluster("cpu")
            assert (c.intra.name, c.inter.name, c.ranks_per_node) == ("pcie-gen4", "ib-200", 1)
    finally:
        set_cluster(None)
