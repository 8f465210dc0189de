"""dist.sim.replay against the event timeline and the plan, and benchmarks/bench_scaling.py end to end
(a tiny sweep writes its tables; --measure runs the real attention under torchrun at P=2 on CPU)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist.plan import relay_start
from dist.sim import COMPUTE_PROFILES, LINK_PROFILES, STRATEGIES, ComputeProfile, LinkProfile, Workload
from dist.sim.model import schedule
from dist.sim.replay import fast_relay_start, from_steps, pass_time, phases, replay_phases
from dist.sim.timeline import replay

ROOT = Path(__file__).resolve().parents[1]
H100, CPU = COMPUTE_PROFILES["h100-bf16"], COMPUTE_PROFILES["cpu-1-thread"]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
def test_fast_relay_start_is_the_plans(layout, causal):
    for p in range(2, 10):
        w = Workload(1, 64, 4, 4, 8, p, causal, layout)
        for a in range(p):
            for holder in range(p):
                assert fast_relay_start(a, holder, p, w) == relay_start(a, holder, p, 64, layout, causal)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_phase_counts_are_the_schedules(strategy, layout):
    """Per step and rank: flops, kernel calls, element-wise bytes, messages and (src, dst) bytes as
    model.schedule has them, and compute time with tiles (ComputeProfile.step_seconds) on each profile."""
    tiled = [ComputeProfile("t", 1e12, 2e12, call_s=1e-6, tile_q=32, tile_k=16, mem_Bps=1e11), H100, CPU]
    for p in (1, 2, 3, 5, 6):
        for backward in (False, True):
            w = Workload(1, 48, 8, 2, 16, p, True, layout, 2, diag_tail=0.25)
            steps = schedule(strategy, w, backward)
            ref, got = from_steps(steps), phases(strategy, w, backward)
            assert len(ref) == len(got)
            for s, a, b in zip(steps, ref, got):
                np.testing.assert_allclose(b.flops, a.flops, rtol=1e-12)
                np.testing.assert_array_equal(b.kernels, a.kernels)
                np.testing.assert_allclose(b.moved, s.moved, rtol=1e-12)
                for compute in tiled:
                    want = [compute.step_seconds(s, r, backward) for r in range(p)]
                    np.testing.assert_allclose(b.compute_s(compute, backward), want, rtol=1e-12)
                assert a.overlapped == b.overlapped and a.collective == b.collective
                if a.overlapped:
                    np.testing.assert_array_equal(b.messages, a.messages)
                    assert sorted(zip(b.src.tolist(), b.dst.tolist(), b.nbytes.tolist())) == \
                        sorted(zip(a.src.tolist(), a.dst.tolist(), a.nbytes.tolist()))
                else:
                    np.testing.assert_array_equal(b.sent, a.sent)
                    np.testing.assert_array_equal(b.messages, a.messages)


CASES = [(p, n, g, lay) for p in (2, 3, 4, 6) for n in (256, 4096) for g in (1, 4) for lay in ("zigzag", "contiguous")]


@pytest.mark.parametrize("link", ["nvlink-h100", "ib-400", "gloo-loopback"])
def test_replay_equals_the_timeline_on_full_duplex_links(link):
    """Where each direction runs at the full rate (duplex 1), the per-step replay is the timeline:
    every strategy, forward and backward, compute-bound and link-bound, equal to rounding."""
    for p, n, g, lay in CASES:
        for compute in (H100, CPU):
            w = Workload(1, n, 32, 32 // g, 128, p, True, lay, 2)
            for s in STRATEGIES:
                for bw in (False, True):
                    ref = replay(schedule(s, w, bw), LINK_PROFILES[link], compute, bw)
                    assert pass_time(s, w, LINK_PROFILES[link], compute, bw) == pytest.approx(ref, rel=1e-9)


def test_replay_within_its_stated_tolerance_at_duplex_below_one():
    """With duplex < 1 (PCIe: 0.8) the replay keeps a port at the duplex rate for the whole step while
    the timeline speeds it up once the opposite direction's message ends: the replay can only be slower,
    by at most 11% at P = 2 and 6% at P >= 3 (where TokenRing's exposed messages overlap less)."""
    link = LINK_PROFILES["pcie-gen4"]
    for p, n, g, lay in CASES:
        w = Workload(1, n, 32, 32 // g, 128, p, True, lay, 2)
        for s in STRATEGIES:
            for bw in (False, True):
                ref = replay(schedule(s, w, bw), link, H100, bw)
                got = pass_time(s, w, link, H100, bw)
                assert ref * (1 - 1e-9) <= got <= ref * (1.11 if p == 2 else 1.06)


def test_replay_of_a_mesh_link_and_shared_ports():
    """per_peer links (a cable per pair) and a port shared by two messages that start apart."""
    for per_peer in (False, True):
        link = LinkProfile("l", 1e9, 1e-5, duplex=1.0, per_peer=per_peer)
        for p in (3, 4, 5):
            w = Workload(1, 512, 8, 8, 64, p, True, "zigzag", 2, diag_tail=0.5)
            for bw in (False, True):
                ref = replay(schedule("tokenring", w, bw), link, H100, bw)
                assert replay_phases(from_steps(schedule("tokenring", w, bw)), link, H100, bw) == pytest.approx(ref)


def _lengths(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "lengths.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(str(int(rng.paretovariate(1.2) * 200)) for _ in range(2000)) + "\n")
    return path


def test_quick_sweep_writes_tables_and_plot(tmp_path):
    from benchmarks.bench_scaling import main

    doc = main(["--quick", "--out", str(tmp_path), "--lengths", str(_lengths(tmp_path)), "--time-limit", "0.2"])
    saved = json.loads((tmp_path / "bench_scaling_quick.json").read_text())
    assert saved["headline"][0]["efficiency"] == pytest.approx(doc["headline"][0]["efficiency"])
    assert list(tmp_path.glob("bench_scaling_quick_*.md")) and (tmp_path / "bench_scaling_quick.png").stat().st_size
    rows = [r for r in saved["weak"] + saved["strong"] if r["runs"]]
    assert {r["strategy"] for r in rows} == {"tokenring", "ring", "allgather", "ulysses", "ulysses x ring"}
    for r in rows:
        assert 0 < r["efficiency"] <= 1 + 1e-9           # never faster than perfectly split compute
        assert (r["why"] == "") == (r["efficiency"] >= 0.9 and r["fits"])
    # the replay check in the results: the timeline's own answer at P = 8
    assert all(abs(c["difference"]) < 1e-9 for c in saved["replay_check"])


def test_measure_mode_runs_under_torchrun_at_p2(tmp_path):
    out = tmp_path / "measure.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "benchmarks" / "bench_scaling.py"), "--measure", "--heads", "4", "--kv-heads", "2",
           "--head-dim", "16", "--seq-len", "256", "--repeats", "2", "--timeout", "60", "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = json.loads(out.read_text())["measure"]
    assert [r["strategy"] for r in rows] == ["tokenring", "ring", "allgather", "ulysses"]
    for r in rows:
        assert r["measured_s"] > 0 and r["predicted_s"] > 0 and r["world"] == 2
    assert "measured beside predicted" in res.stdout


def test_measure_outside_torchrun_is_one_clear_line():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), "--measure"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--measure runs under torchrun" in res.stderr
