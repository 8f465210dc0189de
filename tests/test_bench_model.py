"""benchmarks/bench_model.py: the kernel-time fit on samples with a known answer, the summary, and a
tiny end-to-end run (probe, kernels, 2 ranks)."""

from __future__ import annotations

import pytest

from benchmarks import bench_model


def test_fit_recovers_rate_and_call_cost():
    samples = [(f, 2e-3 + f / 5e9) for f in (1e6, 1e7, 1e8, 1e9)]
    rate, call_s = bench_model._fit(samples)
    assert rate == pytest.approx(5e9, rel=1e-9) and call_s == pytest.approx(2e-3, rel=1e-6)
    # a negative intercept is noise: the fit goes through zero, weighting each sample by 1 / t^2
    rate, call_s = bench_model._fit([(1e6, 1e-4), (2e6, 3e-4)])
    w1, w2 = 1 / 1e-4 ** 2, 1 / 3e-4 ** 2
    assert call_s == 0.0 and rate == pytest.approx((w1 * 1e12 + w2 * 4e12) / (w1 * 1e6 * 1e-4 + w2 * 2e6 * 3e-4))


def test_summary_per_key():
    rows = [{"link": "a", "error": e} for e in (0.05, -0.2, 0.01)] + [{"link": "b", "error": 0.3}]
    (a, b) = bench_model.summary(rows, "link")
    assert (a["points"], a["median_abs_error"], a["worst_error"], a["within_10pct"]) == (3, 0.05, -0.2, 2)
    assert (b["points"], b["worst_error"]) == (1, 0.3)


@pytest.mark.timeout(240)
def test_quick_run_predicts_every_measured_point():
    doc = bench_model.main(["--quick", "--worlds", "2", "--strategies", "tokenring,ulysses"])
    assert {(r["world"], r["strategy"]) for r in doc["rows"]} == {(2, "tokenring"), (2, "ulysses")}
    for r in doc["rows"]:
        assert r["measured_s"] > 0 and r["predicted_s"] > 0
        assert r["error"] == pytest.approx(r["predicted_s"] / r["measured_s"] - 1)
        assert r["error_vs_min"] == pytest.approx(r["predicted_s"] / r["min_s"] - 1)
    assert doc["compute"][2]["basis"] == "measured" and doc["link"]["bandwidth_Bps"] > 0
    assert doc["summary"]["error"]["link"][0]["points"] == 2
