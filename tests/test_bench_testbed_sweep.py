"""benchmarks/bench_testbed_sweep.py's report: model points counted against the measured times, the
"-nocomm" rows (compute measured without messages) and "-nokernel" rows (messages with the kernels
stubbed) reported apart and not counted."""

from __future__ import annotations

import argparse
import json

from benchmarks import bench_testbed_sweep as sweep


def _row(strategy, measured, predicted):
    return {"strategy": strategy, "world_size": 2, "measured_s": measured, "predicted_s": predicted,
            "predicted_compute_s": 0.1, "bytes_per_rank": 0 if strategy.endswith("-nocomm") else 1e6,
            "skipped": None, "wait_s": 0.01}


def test_report_counts_model_points_only(tmp_path):
    args = argparse.Namespace(seq_len=256, heads=2, kv_heads=2, head_dim=16, causal=True, layout="zigzag",
                              json=str(tmp_path / "sweep.json"))
    profile = {"bandwidth_Bps": 24e6, "duplex": 0.97, "rate_while_computing": 0.9, "compute_lost_while_moving": 0.2}
    rows = [_row("tokenring", 1.00, 1.05), _row("ring", 1.00, 1.20), _row("tokenring-nocomm", 0.20, 0.15),
            _row("tokenring-nokernel", 0.80, 0.84)]
    point = {"link": "testbed", "topology": "switch", "rate": "200mbit", "world_size": 2, "profile": profile,
             "returncode": 0, "rows": rows}
    sweep.write_report(args, [point])
    md = (tmp_path / "sweep.md").read_text()
    assert "1 of 2 points within 10% of the measured time (largest error 20.0%)." in md
    assert "The flops model's compute against the -nocomm rows: -25% to -25% (1 rows)" in md
    assert "| tokenring-nocomm | 200.0 |" in md
    assert "-nokernel rows (kernels stubbed): +5.0% to +5.0% (1 rows" in md
    assert json.loads((tmp_path / "sweep.json").read_text())["points"][0]["rows"] == rows
