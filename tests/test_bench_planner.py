"""benchmarks/bench_planner.py --quick runs end to end and writes its results."""

from __future__ import annotations

import gzip
import json
import random

from benchmarks.bench_planner import main


def test_quick_run_writes_results(tmp_path):
    rng = random.Random(0)
    lengths = tmp_path / "lengths.txt.gz"
    with gzip.open(lengths, "wt") as f:
        f.write("\n".join(str(int(rng.paretovariate(1.2) * 200)) for _ in range(2000)) + "\n")
    main(["--quick", "--lengths", str(lengths), "--out", str(tmp_path), "--time-limit", "0.3"])
    result = json.loads((tmp_path / "bench_planner_quick.json").read_text())
    assert {r["world"] for r in result["plan"]} == {8, 64}
    for row in result["step"]:
        # per micro-batch the planner keeps the program's plan only where it beats the greedy (homogeneous) one
        assert row["vs_homog_median"] >= 1 - 1e-9 and row["vs_homog_total"] >= 1 - 1e-9
    assert list(tmp_path.glob("bench_planner_quick_*.md"))
