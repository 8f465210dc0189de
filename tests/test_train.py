"""Training loop: DP equivalence, exact resume, determinism, bad checkpoints, end-to-end torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dist.config import load_config
from tests.multirank import free_port, run_ranks

SMALL = ["data.seq_len_min=32", "data.seq_len_max=160", "data.tokens_per_step=640", "train.warmup_steps=1",
         "log.level=warning"]


def small_cfg(tmp_path, *extra):
    return load_config(None, SMALL + [f"log.dir={tmp_path}/log", *extra])


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_on_ranks(rank, world_size, overrides):
    from dist.train import train

    out = train(load_config(None, overrides))
    return params_of(out["model"]), out["loss"]


def test_dp_two_ranks_equal_one_rank(tmp_path):
    """2 ranks take the same update as 1 rank on the same global batch (fp32)."""
    overrides = SMALL + ["train.steps=2", f"log.dir={tmp_path}/log"]
    one = run_ranks(_train_on_ranks, 1, overrides, init_group=False, timeout_s=120)[0]
    two = run_ranks(_train_on_ranks, 2, overrides, init_group=False, timeout_s=120)
    for k in one[0]:
        # Adam divides by sqrt(v): fp32 summation-order noise stays far below the update size (lr = 3e-3)
        torch.testing.assert_close(two[0][0][k], one[0][k], rtol=1e-5, atol=1e-5)
        assert torch.equal(two[0][0][k], two[1][0][k])  # ranks stay identical
    assert abs(two[0][1] - one[1]) < 1e-5
    assert any(not torch.equal(one[0][k], v) for k, v in params_of(_fresh_model()).items())  # it trained


def _fresh_model():
    from dist.models import build_model

    return build_model("tiny", seed=0)


def test_resume_is_exact_and_runs_are_deterministic(tmp_path):
    from dist.train import train

    ck = f"{tmp_path}/ck"
    straight = train(small_cfg(tmp_path, "train.steps=4", "train.deterministic=true"))
    again = train(small_cfg(tmp_path, "train.steps=4", "train.deterministic=true"))
    first = train(small_cfg(tmp_path, "train.steps=2", f"checkpoint.dir={ck}", "train.deterministic=true",
                            "train.warmup_steps=1"))
    assert first["checkpoint"].endswith("step-2") and os.path.isfile(f"{ck}/step-2/state.json")
    assert not any(n.endswith(".tmp") for n in os.listdir(ck))
    # a second session resumes from the newest checkpoint and finishes the schedule
    cfg = small_cfg(tmp_path, "train.steps=4", f"checkpoint.dir={ck}", "checkpoint.resume=latest",
                    "train.deterministic=true")
    resumed = train(cfg)
    a, b, c = params_of(straight["model"]), params_of(again["model"]), params_of(resumed["model"])
    for k in a:
        assert torch.equal(a[k], b[k]), f"two deterministic runs differ in {k}"
        assert torch.equal(a[k], c[k]), f"resumed run differs in {k}"
    assert straight["loss"] == resumed["loss"]
    # the saved model is a Hugging Face folder
    assert os.path.isfile(f"{ck}/step-4/config.json")
    lines = [json.loads(x) for x in open(f"{tmp_path}/log/metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # the resumed session appended its steps


def test_bad_checkpoint_is_one_clear_error(tmp_path):
    from dist.train import train

    broken = tmp_path / "ck" / "step-3"
    broken.mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        train(small_cfg(tmp_path, "train.steps=4", f"checkpoint.resume={broken}"))
    (broken / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        train(small_cfg(tmp_path, "train.steps=4", f"checkpoint.resume={broken}"))
    r = subprocess.run([sys.executable, "-m", "dist.launch", "train", "--set", f"checkpoint.resume={broken}",
                        "--set", f"log.dir={tmp_path}/log"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_loss_falls(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "dist.launch", "train", "--set", "train.steps=25", "--set", f"log.dir={tmp_path}/log",
           "--set", f"checkpoint.dir={tmp_path}/ck"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(f"{tmp_path}/log/metrics.jsonl")]
    assert [x["step"] for x in rows] == list(range(1, 26))
    assert all(x["tokens_per_s"] > 0 for x in rows)
    first, last = rows[0]["loss"], sum(x["loss"] for x in rows[-3:]) / 3
    assert last < 0.75 * first, (first, last)
    assert os.path.isfile(f"{tmp_path}/ck/step-25/state.json")
