"""benchmarks/bench_ringattn.py at a tiny shape: its counted bytes against the model's byte count; the
"-nocomm" rows (the strategy's kernel calls with no messages) send nothing, the "-nokernel" rows
send what their strategy sends."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_ringattn


def test_ringattn_benchmark_rows(tmp_path):
    out = tmp_path / "ring.json"
    bench_ringattn.main(["--world-sizes", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "8",
                         "--strategies", "tokenring,tokenring-nocomm,allgather,ulysses-nocomm,tokenring-nokernel",
                         "--warmup", "0", "--repeats", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in doc["runs"][0]["rows"]}
    for name in ("tokenring", "allgather"):
        assert rows[name]["bytes_per_rank"] == rows[name]["model_bytes_per_rank"] > 0, name
    for name in ("tokenring-nocomm", "ulysses-nocomm"):
        assert rows[name]["bytes_per_rank"] == rows[name]["model_bytes_per_rank"] == 0, name
    assert rows["tokenring-nokernel"]["bytes_per_rank"] == rows["tokenring"]["bytes_per_rank"]
    assert all(0.0 <= r["wait_s"] <= r["median_s"] for r in rows.values())


def test_ringattn_benchmark_rejects_unknown_strategy(capsys):
    with pytest.raises(SystemExit):
        bench_ringattn.parse_args(["--strategies", "tokenring,ds-ulysses-nocomm"])
    assert "unknown ds-ulysses-nocomm" in capsys.readouterr().err
