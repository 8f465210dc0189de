"""benchmarks/bench_ringattn.py at a tiny shape: its rows against the model's byte count; the
"-nocomm" rows (the strategy's kernel calls with no messages) send nothing, predict the flops
model's compute, and stand in for their strategy's compute in its prediction."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_ringattn


def test_ringattn_benchmark_rows(tmp_path):
    out = tmp_path / "ring.json"
    bench_ringattn.main(["--world-sizes", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "8",
                         "--strategies", "tokenring,tokenring-nocomm,ring-nocomm,allgather,allgather-nocomm,"
                         "ulysses-nocomm,tokenring-nokernel", "--warmup", "0",
                         "--repeats", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in doc["runs"][0]["rows"]}
    assert rows["tokenring"]["bytes_per_rank"] == rows["tokenring"]["model_bytes_per_rank"] > 0
    for name in ("tokenring-nocomm", "ring-nocomm", "allgather-nocomm", "ulysses-nocomm"):
        assert rows[name]["bytes_per_rank"] == rows[name]["model_bytes_per_rank"] == 0, name
        assert rows[name]["predicted_s"] == rows[name]["predicted_compute_s"] > 0
        assert rows[name]["compute_source"] == "flops"
    # the messages alone, kernels stubbed: TokenRing's bytes, a prediction without compute
    nokernel = rows["tokenring-nokernel"]
    assert nokernel["bytes_per_rank"] == rows["tokenring"]["bytes_per_rank"]
    assert nokernel["compute_source"] == "none" and nokernel["predicted_compute_s"] == 0.0
    assert 0 < nokernel["predicted_s"] < rows["tokenring"]["predicted_s"]
    for name in ("tokenring", "allgather"):  # their compute: the measured -nocomm run, not the flops
        assert rows[name]["compute_source"] == "measured"
        assert rows[name]["predicted_compute_s"] == pytest.approx(rows[name + "-nocomm"]["median_s"], rel=1e-9)
        assert rows[name]["predicted_s"] > rows[name]["predicted_compute_s"]
    assert all(0.0 <= r["wait_s"] < r["median_s"] for r in rows.values())
    assert bench_ringattn.repredict(json.loads(out.read_text()))["runs"][0]["rows"] == doc["runs"][0]["rows"]


def test_ringattn_benchmark_rejects_unknown_strategy(capsys):
    with pytest.raises(SystemExit):
        bench_ringattn.parse_args(["--strategies", "tokenring,ds-ulysses-nocomm"])
    assert "unknown ds-ulysses-nocomm" in capsys.readouterr().err
