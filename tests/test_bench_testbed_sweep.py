"""benchmarks/bench_testbed_sweep.py's report: every bench_model row per link type, the median and
worst error per link type, failed points named."""

from __future__ import annotations

import argparse
import json

from benchmarks import bench_testbed_sweep as sweep


def _row(link, strategy, measured, predicted):
    return {"link": link, "world": 2, "seq_len": 1536, "strategy": strategy, "measured_s": measured,
            "predicted_s": predicted, "error": predicted / measured - 1}


def test_report_gives_median_and_worst_error_per_link(tmp_path):
    args = argparse.Namespace(seq_lens="1536", heads=6, head_dim=64, json=str(tmp_path / "sweep.json"))
    switch = [_row("switch-1gbit", "tokenring", 1.0, 1.05), _row("switch-1gbit", "ring", 1.0, 1.20),
              _row("switch-1gbit", "ulysses", 1.0, 0.98)]
    points = [{"link": "switch-1gbit", "world_size": 2, "returncode": 0, "rows": switch},
              {"link": "mesh-1gbit", "world_size": 2, "returncode": 1}]
    sweep.write_report(args, points)
    md = (tmp_path / "sweep.md").read_text()
    assert "| switch-1gbit | 3 | 5.0% | +20.0% | 2 |" in md  # median |error| 5%, worst +20%, 2 within 10%
    assert "| mesh-1gbit | 2 | FAILED (rc=1) |" in md
    assert "| switch-1gbit | 2 | 1536 | ring | 1000.0 | 1200.0 | +20.0% |" in md
    assert json.loads((tmp_path / "sweep.json").read_text())["points"][0]["rows"] == switch
