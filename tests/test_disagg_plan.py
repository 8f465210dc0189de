"""The serving placement search (dist.disagg.plan): its queues against closed forms, its pick against a brute
force that simulates every placement, bad arguments."""

import numpy as np
import pytest

from dist.disagg.plan import (DEVICES, Device, Fitted, Instance, Lengths, Problem, Roofline, Slo, Trace, capacity,
                              instances, main, max_rate, model_shape, prefill_pairs, search, simulate_decode,
                              simulate_prefill)


def test_prefill_queue_matches_md1():
    """Fixed prompts at one FCFS instance: mean TTFT = D + rho D / (2 (1 - rho)) (M/D/1, Pollaczek-Khinchine)."""
    times = Fitted((0.01, 1e-4, 0.0), (0.0, 0.0, 0.0), 0.0, 1e9, 1, 1)
    trace = Trace.sample(Lengths("400"), Lengths("8"), 40000, seed=3)
    d = 0.01 + 400 * 1e-4
    for rho in (0.3, 0.7):
        ttft = simulate_prefill(times, trace, rho / d)
        assert np.mean(ttft) == pytest.approx(d + rho * d / (2 * (1 - rho)), rel=0.05)


def test_decode_alone_sums_its_steps():
    """One request at a time: TPOT = (KV transfer + the sum of its batch-of-one steps) / (outputs - 1)."""
    times = Fitted((0.0, 0.0, 0.0), (0.002, 0.001, 1e-6), 1e-4, 1e8, 1000, 2)
    trace = Trace.sample(Lengths("100:1,900:1"), Lengths("uniform:5:20"), 20, seed=1)
    tpot = simulate_decode(times, trace, 1e-3, lambda p: times.kv_s(p), 64)  # arrivals far apart
    for i in range(20):
        p, o = int(trace.prompt[i]), int(trace.output[i])
        steps = sum(0.002 + 0.001 + 1e-6 * (p + k) for k in range(o - 1))
        assert tpot[i] == pytest.approx((times.kv_s(p) + steps) / (o - 1), rel=1e-9)


def _small_problem():
    """A 7B-class model on a made-up GPU with 2 per node: three prefill, two decode and two colocated configs."""
    dev = Device("test-gpu", 100e12, 1e12, 40, DEVICES["a100-80g"].intra, DEVICES["a100-80g"].inter)
    model = model_shape("llama3-8b")
    trace = Trace.sample(Lengths("exp:600"), Lengths("exp:24"), 60, seed=0)
    problem = Problem(lambda inst: Roofline(model, dev, inst.tp, inst.sp), trace, Slo(0.6, 0.06),
                      lambda p, d: dev.intra, max_batch=64, chunk=256, rel=0.01)
    return problem, instances(2)


def _brute_force(problem: Problem, cands: dict, max_gpus: int):
    """Every placement simulated on its own: the highest total rate R at which each of its n prefill and m
    decode instances (traffic split evenly) keep >= attain inside the SLO."""
    best = []
    slo = problem.slo.attain
    for p in cands["prefill"]:
        for d in cands["decode"]:
            link = problem.kv_link(p, d)
            for n_p in range(1, max_gpus // p.gpus + 1):
                for n_d in range(1, (max_gpus - n_p * p.gpus) // d.gpus + 1):
                    def ok(r, p=p, d=d, n_p=n_p, n_d=n_d, link=link):
                        return float(problem.attainment(p, r / n_p) >= slo
                                     and problem.attainment(d, r / n_d, link) >= slo)
                    bound = min(n_p * capacity(problem.times(p), "prefill", problem.trace, problem.max_batch),
                                n_d * capacity(problem.times(d), "decode", problem.trace, problem.max_batch))
                    best.append((max_rate(ok, bound, 1.0, problem.rel) / (n_p * p.gpus + n_d * d.gpus),
                                 (p, n_p, d, n_d)))
    for c in cands["colocated"]:
        for n in range(1, max_gpus // c.gpus + 1):
            bound = n * capacity(problem.times(c), "colocated", problem.trace, problem.max_batch)
            rate = max_rate(lambda r, c=c, n=n: problem.attainment(c, r / n), bound, slo, problem.rel)
            best.append((rate / (n * c.gpus), (None, 0, c, n)))
    return sorted(best, key=lambda x: -x[0])


def test_search_pick_equals_brute_force():
    problem, cands = _small_problem()
    ranked = search(problem, cands["prefill"], cands["decode"], cands["colocated"], max_gpus=4)
    brute = _brute_force(problem, cands, max_gpus=4)
    assert len(ranked) == len(brute)
    top, (brute_best, _) = ranked[0], brute[0]
    assert brute_best > 0
    assert top.per_gpu == pytest.approx(brute_best, rel=0.03)  # both bisect to 1%
    # the search's pick is among the brute force's best (ties within the bisection's precision)
    pick = (top.prefill, top.n_prefill, top.decode, top.n_decode)
    mine = dict((key, g) for g, key in brute)[pick]
    assert mine >= brute_best * 0.97


def test_more_gpus_per_instance_never_slower():
    """A sanity bound of the roofline: TP2 and SP2 prefill of the same prompt take less time than TP1."""
    model = model_shape("llama3-8b")
    dev = DEVICES["h100-80g"]
    t1, tp2, sp2 = (Roofline(model, dev, tp, sp).step_s(8192, prefill_pairs(8192), 0, 0)
                    for tp, sp in ((1, 1), (2, 1), (1, 2)))
    assert tp2 < t1 and sp2 < t1
    assert Instance("prefill", 2, 2).gpus == 4


@pytest.mark.parametrize("args,needle", [
    (["--prompt-len", "lots"], "length 'lots'"),
    (["--ttft", "-1"], "--ttft"),
    (["--attain", "1.5"], "--attain"),
    (["--device", "tpu"], "--device"),
    (["--model", "/nowhere/model"], "--model"),
    (["--gpus-per-node", "0"], "--gpus-per-node"),
    (["--profile", "/nowhere/probe.json"], "--profile"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, needle, capsys):
    assert main(args + ["--requests", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
