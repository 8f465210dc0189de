"""train.engine = "deepspeed" (ZeRO 1/2) against the torch engine: same loss curve, exact resume, clear errors.

The ranks of the SMALL config get different numbers of sequences at steps 1, 2 and 4 (5 vs 4, 8 vs 7,
5 vs 6), so the zero-weighted passes that keep ZeRO's per-backward collectives matched are exercised.
"""

import json
import subprocess
import sys

import pytest
import torch

from dist.config import ConfigError, deepspeed_available, load_config
from tests.multirank import run_ranks

SMALL = ["data.seq_len_min=32", "data.seq_len_max=160", "data.tokens_per_step=640", "train.warmup_steps=1",
         "train.deterministic=true", "log.level=warning"]
STEPS = 4

needs_deepspeed = pytest.mark.skipif(not deepspeed_available(),
                                     reason="DeepSpeed is not installed (pip install 'dist[deepspeed]')")


def _train(rank, world_size, overrides):
    from dist.train import train

    cfg = load_config(None, overrides)
    out = train(cfg)
    rows = [json.loads(x) for x in open(f"{cfg.log.dir}/metrics.jsonl")] if rank == 0 else None
    return rows, {k: v.detach().clone() for k, v in out["model"].state_dict().items()}


def _run(world, overrides, timeout_s=150):
    return run_ranks(_train, world, SMALL + overrides, init_group=False, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """engine=torch on 2 ranks, 4 steps; leaves a torch checkpoint at step-4."""
    d = tmp_path_factory.mktemp("torch")
    out = _run(2, [f"train.steps={STEPS}", f"log.dir={d}/log", f"checkpoint.dir={d}/ck"])
    return out, d


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """engine=deepspeed, 4 straight steps per ZeRO stage (run on first use), saving step-2 and step-4."""
    runs = {}

    def get(stage):
        if stage not in runs:
            d = tmp_path_factory.mktemp(f"ds{stage}")
            runs[stage] = _run(2, ["train.engine=deepspeed", f"train.zero_stage={stage}", f"train.steps={STEPS}",
                                   f"log.dir={d}/log", f"checkpoint.dir={d}/ck", "checkpoint.every=2"]), d
        return runs[stage]
    return get


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides,match", [
    (["train.engine=megatron"], r"'train\.engine' must be one of \['torch', 'deepspeed', 'fsdp'\]"),
    (["train.zero_stage=3"], r"'train\.zero_stage' = 3 is not supported"),
    (["train.zero_stage=0"], r"'train\.zero_stage' must be 1 or 2"),
    (["train.zero_stage=2.0"], r"'train\.zero_stage' expects int"),
])
def test_bad_engine_config_is_one_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_deepspeed_names_the_extra(monkeypatch):
    import dist.config

    monkeypatch.setattr(dist.config, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.engine.*pip install 'dist\[deepspeed\]'"):
        load_config(None, ["train.engine=deepspeed"])
    load_config(None, ["train.engine=torch"])  # the torch engine never needs it


@pytest.mark.timeout(60)
def test_cli_rejects_zero_stage_3_in_one_line():
    r = subprocess.run([sys.executable, "-m", "dist.launch", "train", "--set", "train.engine=deepspeed",
                        "--set", "train.zero_stage=3"], capture_output=True, text=True, timeout=50)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "zero_stage" in r.stderr, r.stderr


# ------------------------------------------------------------------ training

@needs_deepspeed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_follows_torch(torch_run, ds_runs, stage):
    """Same global batch, same AdamW: ZeRO sums the same gradients (in another order: per micro-step under
    stage 2) and clips with its own fp64 norm, so losses agree to fp32 noise."""
    (ref, _), (out, d) = torch_run, ds_runs(stage)
    losses, ref_losses = [r["loss"] for r in out[0][0]], [r["loss"] for r in ref[0][0]]
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    norms, ref_norms = [r["grad_norm"] for r in out[0][0]], [r["grad_norm"] for r in ref[0][0]]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6)
    for k, v in ref[0][1].items():
        # Adam's m / sqrt(v) magnifies fp32 summation-order noise on near-zero gradients (as in test_train_sp)
        torch.testing.assert_close(out[0][1][k], v, rtol=1e-4, atol=1e-4)
        assert torch.equal(out[0][1][k], out[1][1][k])  # every rank holds the same weights
    state = json.loads((d / "ck" / f"step-{STEPS}" / "state.json").read_text())
    assert (state["engine"], state["zero_stage"], state["world_size"]) == ("deepspeed", stage, 2)
    files = {p.name for p in (d / "ck" / f"step-{STEPS}").iterdir()}
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt", "config.json", "model.safetensors"} <= files
    assert "optimizer.pt" not in files
    from dist.models import load_hf

    saved = load_hf(str(d / "ck" / f"step-{STEPS}")).state_dict()  # the HF folder holds the trained weights
    assert all(torch.equal(saved[k], out[0][1][k]) for k in saved)


@needs_deepspeed
@pytest.mark.timeout(300)
def test_deepspeed_with_sequence_parallelism(torch_run, tmp_path):
    """ZeRO-2's reduce hooks fire between the ring's collectives in backward; one SP group of 2 (dp=1) follows
    the torch engine's dp=2 curve on the same global batch."""
    ref, _ = torch_run
    out = _run(2, ["train.engine=deepspeed", "sp.degree=2", f"train.steps={STEPS}", f"log.dir={tmp_path}/log"])
    torch.testing.assert_close(torch.tensor([r["loss"] for r in out[0][0]]),
                               torch.tensor([r["loss"] for r in ref[0][0]]), rtol=0, atol=1e-5)
    init = _initial_params()
    for k, v in ref[0][1].items():
        assert_same_training(out[0][1][k], v, init[k])
        assert torch.equal(out[0][1][k], out[1][1][k])


def _initial_params():
    from dist.models import build_model

    return {k: v.detach().clone() for k, v in build_model("tiny", seed=0).state_dict().items()}


def assert_same_training(got, ref, init, lr=3e-3):
    """Two runs whose gradients differ only by fp32 summation order (a ring's block sums against one
    rank's) took the same steps. Adam divides by sqrt(v): where a gradient element is near zero its
    sign, and so that element's update (up to ~lr per step), can flip on rounding alone, so a few
    elements may differ by O(lr) while the update as a whole agrees to fp32 noise. Checked: every
    element within 2 x lr x steps, and the difference under 1e-3 of the update's norm."""
    assert (got - ref).abs().max() <= 2 * lr * STEPS
    update = (ref - init).norm()
    assert (got - ref).norm() <= 1e-3 * update + 1e-6, ((got - ref).norm(), update)


@needs_deepspeed
@pytest.mark.timeout(300)
def test_deepspeed_resume_is_bit_exact(ds_runs, tmp_path):
    """Resuming the step-2 checkpoint of a 4-step run and finishing it == the 4 straight steps, bit for bit.

    What makes it exact: each rank's optimizer-rank{R}.pt holds its AdamW state and its fp32 master
    partition, restored as they were (load_from_fp32_weights, not re-derived from the model's weights, which
    would round under bf16/fp16); the data and the schedule are functions of the step; gloo's reductions on
    CPU are deterministic. DeepSpeed does not make it carry over to another world size (the partitioning
    changes), so that is refused (test_resume_mismatch_is_one_clear_error)."""
    straight, d = ds_runs(2)
    resumed = _run(2, ["train.engine=deepspeed", f"train.steps={STEPS}", f"log.dir={tmp_path}/log",
                       f"checkpoint.dir={tmp_path}/ck", f"checkpoint.resume={d}/ck/step-2"])
    for k, v in straight[0][1].items():
        assert torch.equal(resumed[0][1][k], v), f"resumed run differs in {k}"
        assert torch.equal(resumed[1][1][k], v), f"resumed run differs in {k} on rank 1"
    assert [r["step"] for r in resumed[0][0]] == [3, 4]
    assert [r["loss"] for r in resumed[0][0]] == [r["loss"] for r in straight[0][0][2:]]


@needs_deepspeed
@pytest.mark.timeout(300)
def test_deepspeed_resume_takes_the_configured_clipping(ds_runs, tmp_path):
    """ZeRO's state dict carries the clipping it was saved with; a resumed run uses train.grad_clip as
    configured now (as the torch engine does): clipping hard changes the update, so the weights differ."""
    straight, d = ds_runs(2)
    clipped = _run(2, ["train.engine=deepspeed", f"train.steps={STEPS}", "train.grad_clip=1e-4",
                       f"log.dir={tmp_path}/log", f"checkpoint.resume={d}/ck/step-2"])
    assert [r["step"] for r in clipped[0][0]] == [3, 4]
    assert any(not torch.equal(clipped[0][1][k], v) for k, v in straight[0][1].items())


def _resume_errors(rank, world_size, torch_ck, ds_ck, log_dir):
    """One rank: every way of resuming a checkpoint this run cannot load; returns the error messages."""
    from dist.train import train

    attempts = [["train.engine=deepspeed", f"checkpoint.resume={torch_ck}"],   # torch -> deepspeed
                ["train.engine=torch", f"checkpoint.resume={ds_ck}"],         # deepspeed -> torch
                ["train.engine=deepspeed", f"checkpoint.resume={ds_ck}"],     # 2 ranks -> 1 rank
                ["train.engine=deepspeed", "train.zero_stage=1", f"checkpoint.resume={ds_ck}"]]
    messages = []
    for extra in attempts:
        try:
            train(load_config(None, SMALL + [f"train.steps={STEPS + 1}", f"log.dir={log_dir}", *extra]))
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


@needs_deepspeed
@pytest.mark.timeout(300)
def test_resume_mismatch_is_one_clear_error(torch_run, ds_runs, tmp_path):
    (_, torch_dir), (_, ds_dir) = torch_run, ds_runs(2)
    torch_ck, ds_ck = torch_dir / "ck" / f"step-{STEPS}", ds_dir / "ck" / f"step-{STEPS}"
    state = json.loads((torch_ck / "state.json").read_text())
    assert state["engine"] == "torch" and "zero_stage" not in state
    msgs = run_ranks(_resume_errors, 1, str(torch_ck), str(ds_ck), str(tmp_path / "log"), init_group=False,
                     timeout_s=150)[0]
    assert msgs[0] and "train.engine = 'torch'" in msgs[0] and "train.engine = 'deepspeed'" in msgs[0], msgs[0]
    assert msgs[1] and "train.engine = 'deepspeed'" in msgs[1] and "train.engine = 'torch'" in msgs[1], msgs[1]
    assert msgs[2] and "written by 2 ranks, this run has 1" in msgs[2], msgs[2]
    assert msgs[3] and "zero_stage = 2" in msgs[3] and "zero_stage = 1" in msgs[3], msgs[3]
    assert all("\n" not in m for m in msgs)


@needs_deepspeed
@pytest.mark.timeout(300)
def test_deepspeed_bf16_resume_is_bit_exact(tmp_path):
    """bf16 weights: the fp32 master partitions in optimizer-rank{R}.pt (not the rounded bf16 weights)
    carry the resumed run, so it matches the straight one bit for bit."""
    common = ["train.engine=deepspeed", "model.dtype=bfloat16", "train.steps=3"]
    straight = _run(2, common + [f"log.dir={tmp_path}/a", f"checkpoint.dir={tmp_path}/ck", "checkpoint.every=1"])
    resumed = _run(2, common + [f"log.dir={tmp_path}/b", f"checkpoint.resume={tmp_path}/ck/step-1"])
    assert [r["step"] for r in resumed[0][0]] == [2, 3]
    assert [r["loss"] for r in resumed[0][0]] == [r["loss"] for r in straight[0][0][1:]]
    for k, v in straight[0][1].items():
        assert v.dtype == torch.bfloat16 and torch.equal(resumed[0][1][k], v), k
