"""Repository contracts: README's Quickstart, .ci/run, launch/ configs."""

import glob
import json
import os
import re

import pytest

from dist.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = re.search(r"^## Quickstart$(.*?)^## ", text, re.M | re.S).group(1)
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    main_job, tests = quickstart_commands()
    assert "dist.launch train" in main_job and "pip install torch==2.13.0" in main_job
    assert "pytest" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert tests in ci.splitlines(), ".ci/run must run exactly README's test command"


def test_dist_is_not_ignored():
    ignore = open(os.path.join(ROOT, ".gitignore")).read().split()
    assert not {"dist", "dist/", "/dist", "/dist/"} & set(ignore)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "launch", "*.toml"))))
def test_launch_configs_load(path, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = load_config(path, [f"data.path={data}"] if "jsonl" in path else [])
    assert cfg.train.steps > 0


def test_readme_is_a_users_guide_of_at_most_250_lines():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 250, len(lines)
    for link in re.findall(r"\]\(([^)#]+)\)", "\n".join(lines)):  # every local link resolves
        if not link.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, link)), link
