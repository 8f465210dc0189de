"""dist.seqpar.planner and its cost model: optimum against brute force, constraints, fallback, bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest

from dist.seqpar import CostModel, candidate_groups, plan_scatter
from dist.seqpar.profile import fit, fit_doc, fit_group
from dist.seqpar.profile import main as profile_main
from dist.sim import LINK_PROFILES, Workload, bytes_per_rank
from tests.multirank import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One rank per "node": every group pays the slow link, so heterogeneous plans matter.
CM = CostModel(attn_s=2e-10, linear_s=1e-6, const_s=1e-4, heads_q=8, heads_kv=8, head_dim=64, n_layers=4,
               intra_link="nvlink-h100", inter_link="ib-200", gpus_per_node=1)


# ---------------------------------------------------------------- cost model

@pytest.mark.parametrize("strategy,degree", [("tokenring", 4), ("ring", 2), ("ulysses", 8), ("allgather", 4)])
def test_time_is_compute_plus_dist_sim_bytes_on_the_spanned_link(strategy, degree):
    cm = CostModel(strategy=strategy, heads_q=8, heads_kv=8, head_dim=64, n_layers=3, gpus_per_node=4)
    seq = 6144
    local = seq // degree
    link = LINK_PROFILES[cm.intra_link if degree <= 4 else cm.inter_link]
    rate = (link.alltoall_Bps or link.bandwidth_Bps) if strategy == "ulysses" else link.bandwidth_Bps
    sent = max(bytes_per_rank(strategy, Workload(1, local, 8, 8, 64, degree, True, "zigzag", 2)))
    expected = ((cm.attn_s * seq ** 2 + cm.linear_s * seq) / degree + cm.const_s
                + 3 * (sent / rate + 2 * (degree - 1) * link.latency_s))
    assert cm.time(seq, degree) == pytest.approx(expected, rel=1e-9)
    assert cm.time(seq, 1) == pytest.approx(cm.attn_s * seq ** 2 + cm.linear_s * seq + cm.const_s, rel=1e-12)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_large_groups_bytes_match_dist_sim(strategy):
    # past 16 ranks the ring strategies' bytes are extrapolated, not replayed: they must still agree
    cm = CostModel(strategy=strategy, heads_q=64, heads_kv=64, head_dim=64, n_layers=1, gpus_per_node=8,
                   attn_s=0.0, linear_s=0.0, const_s=0.0)
    seq, degree = 64 * 512, 64
    link = LINK_PROFILES[cm.inter_link]
    rate = (link.alltoall_Bps or link.bandwidth_Bps) if strategy == "ulysses" else link.bandwidth_Bps
    sent = max(bytes_per_rank(strategy, Workload(1, seq // degree, 64, 64, 64, degree, True, "zigzag", 2)))
    comm = cm.time(seq, degree) - 2 * (degree - 1) * link.latency_s
    assert comm == pytest.approx(sent / rate, rel=1e-9)


def test_packed_pass_and_memory_and_json(tmp_path):
    # one pass of a group packs its sequences: the per-pass terms once, not per sequence
    assert CM.group_time([1000, 3000], 4) == pytest.approx(CM.time(1000, 4) + CM.time(3000, 4) - CM.pass_time(4))
    assert CM.group_time([], 4) == 0.0
    # a group leaving its node pays the inter-node link
    assert CostModel(gpus_per_node=2).time(8192, 4) > CostModel(gpus_per_node=8).time(8192, 4)
    cm = CostModel(state_bytes=10e9, act_bytes_per_token=1e5)
    assert cm.tokens_capacity(80e9) == 700_000 and cm.tokens_capacity(5e9) == 0
    assert cm.memory_bytes(700_000) == pytest.approx(80e9)
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({**CM.to_dict(), "fit": {"max_rel_err": 0.01}}))
    assert CostModel.load(path) == CM
    path.write_text(json.dumps({"attn_s": 1e-9, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        CostModel.load(path)
    path.write_text(json.dumps({"n_layers": "many"}))
    with pytest.raises(ValueError, match="n_layers"):
        CostModel.load(path)
    with pytest.raises(ValueError, match="strategy"):
        CostModel(strategy="zigzag")


def test_profile_fit_recovers_coefficients_and_writes_a_loadable_model(tmp_path, capsys):
    lengths = [128, 256, 512, 1024, 2048]
    times = [3e-9 * n * n + 2e-5 * n + 4e-3 for n in lengths]
    (attn_s, linear_s, const_s), errors = fit(lengths, times)
    assert (attn_s, linear_s, const_s) == pytest.approx((3e-9, 2e-5, 4e-3), rel=1e-6)
    assert max(abs(e) for e in errors) < 1e-9
    out = tmp_path / "cost.json"
    assert profile_main(["--lengths", "16,32,64", "--repeats", "1", "--out", str(out)]) == 0
    cm = CostModel.load(out)
    assert cm.n_layers == 2 and cm.heads_q == 4 and cm.heads_kv == 2  # the tiny preset's shapes
    assert cm.time(64, 1) > 0 and cm.time(64, 4) > 0  # its links are dist.sim profiles
    assert "fit error" in capsys.readouterr().out
    assert profile_main(["--lengths", "16,32", "--out", str(out)]) == 2


def test_measured_pass_terms_are_one_latency_per_ring_message():
    # brute force: walk every layer, direction and ring step of one pass and add its latency
    cm = CostModel(attn_s=0.0, linear_s=0.0, const_s=1e-3, n_layers=3, heads_q=8, heads_kv=8, head_dim=64,
                   gpus_per_node=4, latency_s=2e-3, group_pass_s=5e-3, step_s=0.25, doc_s=1e-4)
    for degree in (1, 2, 4):
        expected = cm.const_s + (cm.group_pass_s if degree > 1 else 0.0)
        for _layer, _direction, _step in itertools.product(range(3), ("forward", "backward"), range(degree - 1)):
            expected += cm.latency_s
        assert cm.pass_time(degree) == pytest.approx(expected, rel=1e-12)
        # each packed sequence: one attention call per layer, ring block (d of them) and direction
        for _seq, _layer, _direction, _block in itertools.product(range(2), range(3), range(2), range(degree)):
            expected += cm.doc_s
        bytes_only = CostModel(**{**cm.to_dict(), "doc_s": 0.0})  # attn_s = linear_s = 0: the link's bytes
        expected += bytes_only.token_time(64, degree) + bytes_only.token_time(128, degree)
        assert cm.group_time([64, 128], degree) == pytest.approx(expected, rel=1e-12)
    # beyond the node the link profile's latency holds: latency_s is measured inside one
    inter = LINK_PROFILES[cm.inter_link].latency_s
    assert cm.pass_time(8) == pytest.approx(cm.const_s + cm.group_pass_s + 3 * 2 * 7 * inter, rel=1e-12)
    assert cm.step_time(1.5) == 1.75 and CostModel().step_time(1.5) == 1.5
    with pytest.raises(ValueError, match="latency_s"):
        CostModel(latency_s=-1.0)


def test_group_fit_recovers_pass_terms():
    degrees, n_layers = [2, 4, 8], 2
    assert fit_doc([1, 2, 4], [n_layers * 2 * d * 6e-4 for d in (1, 2, 4)], n_layers) == pytest.approx(6e-4)
    assert fit_doc([1, 2], [-1e-3, -2e-3], n_layers) == 0.0
    overheads = [7e-3 + n_layers * 2 * (d - 1) * 3e-4 for d in degrees]
    assert fit_group(degrees, overheads, n_layers) == pytest.approx((7e-3, 3e-4), rel=1e-9)
    assert fit_group([4], [12 * 3e-4], n_layers) == pytest.approx((0.0, 3e-4), rel=1e-9)
    assert fit_group([2, 4], [-1e-3, -2e-3], n_layers) == (0.0, 0.0)  # nothing beyond compute: no terms


def test_profile_world_probe_reproduces_its_measured_pass(tmp_path):
    # 2 ranks: one group size, so the fitted terms give back the measured pass of that size exactly
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, "-m", "dist.seqpar.profile", "--world", "2", "--lengths", "16,32,64",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    cm = CostModel.load(out)
    n, measured = data["fit"]["pass_len"], data["fit"]["pass_s"]["2"]
    assert cm.step_s > 0 and cm.group_pass_s == 0.0
    if measured > cm.token_time(n, 2) + cm.const_s:  # else nothing beyond compute was left to fit
        assert cm.token_time(n, 2) + cm.pass_time(2) == pytest.approx(measured, rel=1e-9)
    bad = subprocess.run([sys.executable, "-m", "dist.seqpar.profile", "--world", "3", "--lengths", "16,32,64",
                          "--out", str(out)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert bad.returncode == 2 and "--world" in bad.stderr


def test_config_keys(tmp_path):
    from dist.config import ConfigError, load_config

    cfg = load_config(None, ["model.preset=llama3-8b", "sp.strategy=auto"])
    cm = CostModel.from_config(cfg)
    assert (cm.heads_q, cm.heads_kv, cm.n_layers, cm.strategy) == (32, 8, 32, "auto")
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(CM.to_dict()))
    assert CostModel.from_config(load_config(None, [f"sp.cost_model='{path}'"])) == CM
    with pytest.raises(ConfigError, match="sp.cost_model"):
        load_config(None, ["sp.cost_model='/nonexistent.json'"])
    with pytest.raises(ConfigError, match="sp.plan_time_limit_s"):
        load_config(None, ["sp.plan_time_limit_s=-1"])


# ---------------------------------------------------------------- plans

def check_plan(plan, lens, world, cap, cm):
    """Every constraint of the contract, and the predicted time recomputed from the groups."""
    candidates = set(candidate_groups(world))
    seen = []
    total = 0.0
    for mb in plan.microbatches:
        ranks = [r for g in mb for r in g.ranks]
        assert len(ranks) == len(set(ranks)), "groups of a micro-batch overlap"
        slowest = 0.0
        for g in mb:
            assert g.ranks in candidates
            assert g.seq_ids, "an empty group"
            assert sum(lens[i] for i in g.seq_ids) <= len(g.ranks) * cap, "a rank over max_tokens_per_rank"
            seen += g.seq_ids
            slowest = max(slowest, sum(cm.time(lens[i], len(g.ranks)) for i in g.seq_ids)
                          - (len(g.seq_ids) - 1) * cm.pass_time(len(g.ranks)))
        total += slowest
    assert sorted(seen) == list(range(len(lens))), "a sequence missing or placed twice"
    assert plan.predicted_step_s == pytest.approx(total, rel=1e-9)


def brute_force(lens, world, cap, cm):
    """The best single-micro-batch plan: every partition of the sequences into groups, every size per group."""
    sizes = [1 << i for i in range(world.bit_length())]

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            yield [[first]] + p
            for k in range(len(p)):
                yield p[:k] + [[first] + p[k]] + p[k + 1:]

    best = math.inf
    for part in partitions(list(range(len(lens)))):
        for ds in itertools.product(sizes, repeat=len(part)):
            if sum(ds) > world or any(sum(lens[i] for i in blk) > d * cap for blk, d in zip(part, ds)):
                continue
            best = min(best, max(cm.group_time([lens[i] for i in blk], d) for blk, d in zip(part, ds)))
    return best


def test_candidate_groups_nest():
    groups = candidate_groups(16)
    assert len(groups) == 31
    for r in range(16):
        assert sum(r in g for g in groups) == 5  # log2(16) + 1 process groups per rank
    for a, b in itertools.combinations(groups, 2):
        assert not set(a) & set(b) or set(a) <= set(b) or set(b) <= set(a)


@pytest.mark.parametrize("seed", range(8))
def test_optimum_equals_brute_force(seed):
    rng = random.Random(seed)
    world, cap, best = rng.choice([4, 8]), 4096, math.inf
    while best == math.inf:  # one long sequence, a few short ones, all in one micro-batch
        lens = [rng.randint(cap, 2 * cap)] + [rng.randint(1000, 3500) for _ in range(rng.randint(3, 5))]
        if sum(lens) <= world * cap * 3 // 4:
            best = brute_force(lens, world, cap, CM)
    plan = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=CM, time_limit_s=20)
    check_plan(plan, lens, world, cap, CM)
    assert plan.solver == "lp"
    assert len(plan.microbatches) == 1
    assert plan.predicted_step_s == pytest.approx(best, rel=1e-6)


def test_mixed_sizes_beat_the_best_homogeneous_plan():
    lens, world, cap = [4834, 1081, 2644, 3250], 4, 4096
    plan = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=CM, time_limit_s=20)
    greedy = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=CM, time_limit_s=0)
    assert plan.predicted_step_s == pytest.approx(brute_force(lens, world, cap, CM), rel=1e-6)
    assert plan.predicted_step_s < greedy.predicted_step_s / 1.1
    assert sorted(len(g.ranks) for g in plan.microbatches[0]) == [1, 1, 2]


@pytest.mark.parametrize("seed", range(8))
def test_random_plans_keep_every_constraint(seed):
    rng = random.Random(100 + seed)
    world = rng.choice([4, 8, 16, 32])
    cap = rng.choice([2048, 8192])
    lens = [max(1, min(int(rng.lognormvariate(6.5, 1.5)), world * cap)) for _ in range(rng.randint(5, 120))]
    plan = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=CM, time_limit_s=0.5)
    check_plan(plan, lens, world, cap, CM)
    greedy = plan_scatter(lens, world, max_tokens_per_rank=cap, cost_model=CM, time_limit_s=0)
    check_plan(greedy, lens, world, cap, CM)
    assert greedy.solver == "greedy"
    assert plan.predicted_step_s <= greedy.predicted_step_s * (1 + 1e-12)


def test_pooled_program_on_a_large_micro_batch():
    # 64 ranks, 8 per node, 300 long-tailed lengths: too many group slots for the exact program
    rng = random.Random(7)
    lens = [min(int(rng.paretovariate(1.1) * 300), 60000) for _ in range(300)] + [60000]
    cm = CostModel(strategy="auto")
    plan = plan_scatter(lens, 64, max_tokens_per_rank=16384, cost_model=cm, time_limit_s=10)
    greedy = plan_scatter(lens, 64, max_tokens_per_rank=16384, cost_model=cm, time_limit_s=0)
    check_plan(plan, lens, 64, 16384, cm)
    assert plan.solver == "lp" and plan.predicted_step_s < greedy.predicted_step_s
    assert len({len(g.ranks) for g in plan.microbatches[0]}) > 1


def test_greedy_fallback_without_pulp(monkeypatch):
    lens = [300, 5000, 120, 900, 2500, 60]
    monkeypatch.setitem(sys.modules, "pulp", None)  # import pulp raises ImportError
    plan = plan_scatter(lens, 8, max_tokens_per_rank=2048, cost_model=CM)
    assert plan.solver == "greedy"
    check_plan(plan, lens, 8, 2048, CM)
    sizes = {len(g.ranks) for mb in plan.microbatches for g in mb}
    assert len(sizes) == 1, "the greedy plan is homogeneous per micro-batch"


def test_micro_batches_when_the_batch_does_not_fit_at_once():
    lens = [4000] * 6 + [100] * 10
    plan = plan_scatter(lens, 4, max_tokens_per_rank=2048, cost_model=CM, time_limit_s=1)
    check_plan(plan, lens, 4, 2048, CM)
    assert len(plan.microbatches) >= math.ceil(sum(lens) / (4 * 2048))


def test_same_input_same_plan():
    lens = [700, 3000, 150, 150, 2200, 40, 9000]
    a = plan_scatter(lens, 8, max_tokens_per_rank=4096, cost_model=CM, time_limit_s=5)
    b = plan_scatter(lens, 8, max_tokens_per_rank=4096, cost_model=CM, time_limit_s=5)
    assert a.microbatches == b.microbatches and a.predicted_step_s == b.predicted_step_s


def _plan_on_rank_body(rank, world_size):
    from dist.seqpar import plan_on_rank

    lens = [700, 3000, 150, 2200, 40, 9000] if rank == 0 else [5] * (rank + 1)  # only rank 0's count
    plan = plan_on_rank(lens, 8, max_tokens_per_rank=4096, cost_model=CM, time_limit_s=2)
    try:
        plan_on_rank([10, 99999] if rank == 0 else [1], 8, max_tokens_per_rank=4096, cost_model=CM)
        error = ""
    except ValueError as e:
        error = str(e)
    return [[(g.ranks, g.seq_ids) for g in mb] for mb in plan.microbatches], error


def test_rank_zero_plans_and_every_rank_gets_its_plan():
    results = run_ranks(_plan_on_rank_body, 2, timeout_s=120)
    local = plan_scatter([700, 3000, 150, 2200, 40, 9000], 8, max_tokens_per_rank=4096, cost_model=CM,
                         time_limit_s=2)
    expected = [[(g.ranks, g.seq_ids) for g in mb] for mb in local.microbatches]
    for microbatches, error in results:
        assert microbatches == expected
        assert error.startswith("sequence 1 (99999 tokens)")


def test_bad_input():
    with pytest.raises(ValueError, match="sequence 2 .*whole cluster"):
        plan_scatter([10, 20, 9000], 4, max_tokens_per_rank=2048, cost_model=CM)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        plan_scatter([10], 4, max_tokens_per_rank=0, cost_model=CM)
    with pytest.raises(ValueError, match="world_size 6 .*power-of-two"):
        plan_scatter([10], 6, max_tokens_per_rank=100, cost_model=CM)
    with pytest.raises(ValueError, match="sequence 1 has length 0"):
        plan_scatter([10, 0], 4, max_tokens_per_rank=100, cost_model=CM)
    ulysses = CostModel(strategy="ulysses", heads_q=6, heads_kv=3)
    with pytest.raises(ValueError, match="sequence 0 .*heads_q=6"):  # needs 2 ranks; no size > 1 divides 3
        plan_scatter([150], 4, max_tokens_per_rank=100, cost_model=ulysses)
    assert plan_scatter([90, 80], 4, max_tokens_per_rank=100, cost_model=ulysses).predicted_step_s > 0
    assert plan_scatter([], 4, max_tokens_per_rank=100, cost_model=CM).microbatches == []
