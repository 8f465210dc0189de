import subprocess
import sys

import pytest

from dist.config import Config, ConfigError, check_world, load_config, parse_override, to_toml
from dist.runtime import Mesh


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults_file_and_overrides(tmp_path):
    path = write(tmp_path, '[train]\nsteps = 7\nlr = 1\n[sp]\ndegree = 2\n')
    cfg = load_config(path, ["train.steps=9", "checkpoint.dir=runs/a", 'log.dir="x y"', "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 9            # override beats file
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted for float
    assert cfg.sp.degree == 2
    assert cfg.checkpoint.dir == "runs/a"  # bare string fallback
    assert cfg.log.dir == "x y"
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.model.preset == Config().model.preset


@pytest.mark.parametrize("text", ["1e-4", "true", "3", '"s"', "[1, 2]", "plain"])
def test_parse_override_types(text):
    expected = {"1e-4": 1e-4, "true": True, "3": 3, '"s"': "s", "[1, 2]": [1, 2], "plain": "plain"}[text]
    assert parse_override(f"a.b={text}") == ("a.b", expected)


@pytest.mark.parametrize("overrides,key", [
    (["train.stepz=3"], "train.stepz"),
    (["nosection.x=1"], "nosection.x"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["train.deterministic=1"], "train.deterministic"),
    (["sp.strategy=bogus"], "sp.strategy"),
    (["model.preset=gpt5"], "model.preset"),
    (["train.steps=0"], "train.steps"),
    (["data.kind=jsonl"], "data.path"),
    (["data.kind=jsonl", "data.path=/nonexistent/file.jsonl"], "data.path"),
    (["checkpoint.resume=/nonexistent/step-3"], "checkpoint.resume"),
    (["model.path=/nonexistent/model"], "model.path"),
    (["data.seq_len_min=900", "data.seq_len_max=100"], "data.seq_len_min"),
    (["train.steps"], "key=value"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_malformed_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_config(write(tmp_path, "[train\nsteps = 3"))
    with pytest.raises(ConfigError, match="unknown config key 'train.foo'"):
        load_config(write(tmp_path, "[train]\nfoo = 3"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))


def test_world_checks():
    cfg = load_config(None, ["sp.degree=3"])
    with pytest.raises(ConfigError, match="sp.degree"):
        check_world(cfg, 4)
    check_world(cfg, 6)
    m = Mesh(8, 2)
    assert (m.dp, m.coords(5), m.sp_ranks(1), m.dp_ranks(1)) == (4, (2, 1), [2, 3], [1, 3, 5, 7])
    with pytest.raises(ValueError, match="divide"):
        Mesh(4, 3)


def test_print_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11", "log.dir=a/b"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "dist.launch", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_errors_are_one_line():
    r = run_cli("train", "--set", "train.stepz=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.stepz" in r.stderr
    r = run_cli("train", "--print-config", "--set", "train.steps=4")
    assert r.returncode == 0 and "steps = 4" in r.stdout
    assert run_cli("train", "--help").returncode == 0
    assert run_cli("serve", "--help").returncode == 0
