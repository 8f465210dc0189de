"""benchmarks/common.py: every benchmark's results files keep their names, and the JSON reads back
as the document written (numpy and torch scalars as numbers)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from benchmarks import common


def test_write_results_names_and_round_trip(tmp_path):
    doc = {"date": common.today(), "rows": [{"s": np.float32(0.5), "n": np.int64(3), "t": torch.tensor(2.0)}],
           "dtype": torch.float32}
    json_path, md_path = common.write_results("bench_x", doc, "# x\n", str(tmp_path / "out"))
    assert json_path == str(tmp_path / "out" / "bench_x.json")
    assert md_path == str(tmp_path / "out" / f"bench_x_{doc['date']}.md")
    back = json.loads(open(json_path).read())
    assert back == {"date": doc["date"], "rows": [{"s": 0.5, "n": 3, "t": 2.0}], "dtype": "torch.float32"}
    assert open(md_path).read() == "# x\n"


def test_write_results_other_markdown_names(tmp_path):
    # bench_model / bench_ringattn: <name>-<date>.md; bench_links / the sweep: <name>.md or a path given
    out_dir, name = common.results_at(str(tmp_path / "ringattn_gloo.json"))
    assert (out_dir, name) == (str(tmp_path), "ringattn_gloo")
    _, md = common.write_results(name, {}, "a", out_dir, md_name=f"{name}-2026-12-06.md")
    assert md == str(tmp_path / "ringattn_gloo-2026-12-06.md") and os.path.exists(md)
    elsewhere = str(tmp_path / "sub" / "links.md")
    os.makedirs(os.path.dirname(elsewhere))
    _, md = common.write_results(name, {}, "b", out_dir, md_name=elsewhere)
    assert md == elsewhere and open(elsewhere).read() == "b"


def test_machine_line():
    line = common.machine(load_start=1.5)
    assert f"{os.cpu_count()} cores" in line and f"torch {torch.__version__}" in line
    assert "load average 1.5 at the start," in line and line.endswith("at the end")
    assert ("x " + torch.cuda.get_device_name(0) in line) if torch.cuda.is_available() else " x " not in line
