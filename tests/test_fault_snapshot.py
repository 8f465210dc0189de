"""Snapshots in host memory: a second session of the same job resumes from them bit-exactly; what does not
belong to the job, or fails its checksum, is never loaded. Ranks are spawned gloo processes (no torchrun):
the job id is TORCHELASTIC_RUN_ID, set per test."""

import contextlib
import glob
import json
import os
import signal
import time
import uuid

import pytest
import torch

from dist.config import load_config
from tests.multirank import run_ranks

SMALL = ["data.seq_len_min=32", "data.seq_len_max=160", "data.tokens_per_step=640", "train.warmup_steps=1",
         "train.deterministic=true", "log.level=warning"]


def _train(rank, world_size, overrides):
    from dist.train import train

    out = train(load_config(None, overrides))
    return ({k: v.detach().clone() for k, v in out["model"].state_dict().items()},
            out["optimizer"].state_dict()["state"], out["start"])


@pytest.fixture
def job():
    """A fresh job id; afterwards its managers are stopped and /dev/shm holds nothing of it."""
    rid = f"test-{uuid.uuid4().hex[:8]}"
    yield rid
    for pid_file in glob.glob(f"/dev/shm/dist-snap-{rid}-h*/manager.pid"):
        try:
            os.kill(int(open(pid_file).read()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 10
    while glob.glob(f"/dev/shm/dist-snap-{rid}-*") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not glob.glob(f"/dev/shm/dist-snap-{rid}-*"), "the manager left shared memory behind"


def run(world, job, overrides, tmp, generation=0):
    """The ranks of one generation of workers (TORCHELASTIC_RESTART_COUNT = generation)."""
    return run_ranks(_train, world, SMALL + [f"log.dir={tmp}/log", "train.steps=6"] + overrides, init_group=False,
                     env={"TORCHELASTIC_RUN_ID": job, "TORCHELASTIC_RESTART_COUNT": str(generation)},
                     timeout_s=150)


def killed(world, job, overrides, tmp):
    """A first generation in which rank kill_rank dies by SIGKILL (the others then fail on the lost peer)."""
    with pytest.raises(RuntimeError, match="multi-rank run failed"):
        run(world, job, overrides + ["runtime.timeout_s=20"], tmp)


def assert_same(a, b):
    (pa, oa, _), (pb, ob, _) = a, b
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} differs"
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), f"optimizer state {i}.{k} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference: 2 ranks, 6 steps, no snapshots."""
    return run(2, f"ref-{uuid.uuid4().hex[:8]}", [], tmp_path_factory.mktemp("ref"))[0]


def test_killed_rank_resumes_from_memory_bit_exact(tmp_path, job, straight):
    snap = ["fault.snapshot_every=1", "fault.kill_step=4", "fault.kill_rank=1"]
    killed(2, job, snap, tmp_path)
    heads = sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/dist-snap-{job}-h0/r*.head*.json"))
    assert heads, "no committed snapshot in host memory"
    folder = f"/dev/shm/dist-snap-{job}-h0"
    old_manager = int(open(f"{folder}/manager.pid").read())
    os.kill(old_manager, signal.SIGKILL)  # the manager killed alone: the segments stay, a new one is started
    resumed = run(2, job, snap, tmp_path, generation=1)
    assert int(open(f"{folder}/manager.pid").read()) != old_manager
    assert resumed[0][2] in (3, 4)  # the newest snapshot every rank committed: 4, or 3 if 4 was in flight
    for r in range(2):
        assert_same(resumed[r], straight)


def test_corrupted_snapshot_is_not_loaded_and_the_disk_checkpoint_is(tmp_path, job, straight):
    """A flipped byte in each of rank 0's committed snapshots (4 and, if it committed before rank 1 died,
    5) leaves no snapshot every rank holds intact: the restart falls back to the disk checkpoint of step 3."""
    snap = ["fault.snapshot_every=1", "fault.kill_step=5", "fault.kill_rank=1", f"checkpoint.dir={tmp_path}/ck",
            "checkpoint.every=3", "checkpoint.resume=latest"]
    killed(2, job, snap, tmp_path)
    heads = glob.glob(f"/dev/shm/dist-snap-{job}-h0/r0.head*.json")
    assert {json.load(open(p))["version"] for p in heads} & {4, 5}, "no committed snapshot in host memory"
    for p in heads:
        with open(p.replace(".json", "").replace(".head", ".data"), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
    resumed = run(2, job, snap, tmp_path, generation=1)
    assert resumed[0][2] == 3
    for r in range(2):
        assert_same(resumed[r], straight)


def test_snapshot_of_another_config_is_never_loaded(tmp_path, job):
    snap = ["fault.snapshot_every=1", "fault.kill_step=4", "fault.kill_rank=1"]
    killed(2, job, snap, tmp_path)
    other = run(2, job, snap + ["train.lr=1e-3"], tmp_path, generation=1)
    assert other[0][2] == 0  # started from scratch: the snapshots belong to another config


def _train_ds(rank, world_size, overrides):
    """Model parameters, and this rank's ZeRO partition: fp32 master weights and AdamW moments."""
    from dist.train import train

    out = train(load_config(None, overrides))
    opt = out["optimizer"]
    part = [t.detach().clone() for t in opt.single_partition_of_fp32_groups]
    moments = {f"{i}.{k}": v.detach().clone() for i, s in enumerate(opt.optimizer.state.values())
               for k, v in s.items()}
    return {k: v.detach().clone() for k, v in out["model"].state_dict().items()}, part, moments, out["start"]


def _uninterrupted_and_resumed(train_fn, engine: list, tmp_path, job):
    """2 ranks of train_fn: an uninterrupted run, then one killed at step 3 (rank 1) with every-step
    snapshots and its restarted generation. Returns (reference results, resumed results)."""
    def go(rid, extra, generation=0):
        return run_ranks(train_fn, 2, SMALL + [f"log.dir={tmp_path}/log"] + engine + extra, init_group=False,
                         env={"TORCHELASTIC_RUN_ID": rid, "TORCHELASTIC_RESTART_COUNT": str(generation)},
                         timeout_s=200)

    ref = go(f"{job}-ref", [])
    snap = ["fault.snapshot_every=1", "fault.kill_step=3", "fault.kill_rank=1"]
    with pytest.raises(RuntimeError, match="multi-rank run failed"):
        go(job, snap + ["runtime.timeout_s=20"])
    return ref, go(job, snap, generation=1)


@pytest.mark.slow
def test_deepspeed_zero2_partitions_resume_from_memory_bit_exact(tmp_path, job):
    from dist.config import deepspeed_available

    if not deepspeed_available():
        pytest.skip("DeepSpeed is not installed")
    ref, resumed = _uninterrupted_and_resumed(_train_ds, ["train.engine=deepspeed", "train.zero_stage=2",
                                                          "train.steps=5"], tmp_path, job)
    for r in range(2):
        params, part, moments, start = resumed[r]
        assert start in (2, 3)
        for k in params:
            assert torch.equal(params[k], ref[r][0][k]), k
        assert all(torch.equal(a, b) for a, b in zip(part, ref[r][1]))
        assert moments.keys() == ref[r][2].keys()
        assert all(torch.equal(moments[k], ref[r][2][k]) for k in moments)


def test_hung_manager_is_reported_and_its_memory_not_loaded(tmp_path, job, straight, capfd):
    """The manager stopped (SIGSTOP), its segments intact: after fault.manager_timeout_s without a beat the
    restart reports it in one line, loads nothing from it (falls back to the disk checkpoint of step 3) and
    replaces the manager."""
    snap = ["fault.snapshot_every=1", "fault.kill_step=5", "fault.kill_rank=1", f"checkpoint.dir={tmp_path}/ck",
            "checkpoint.every=3", "checkpoint.resume=latest", "fault.manager_timeout_s=2"]
    killed(2, job, snap, tmp_path)
    folder = f"/dev/shm/dist-snap-{job}-h0"
    assert glob.glob(f"{folder}/r*.head*.json"), "no committed snapshot in host memory"
    hung = int(open(f"{folder}/manager.pid").read())
    os.kill(hung, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while time.time() - os.stat(f"{folder}/beat").st_mtime <= 2.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        resumed = run(2, job, snap + ["log.level=warning"], tmp_path, generation=1)
    finally:
        with contextlib.suppress(OSError):
            os.kill(hung, signal.SIGKILL)
    assert capfd.readouterr().err.count("has not answered") == 1
    assert resumed[0][2] == 3  # from the disk checkpoint, not from the hung manager's memory
    for r in range(2):
        assert_same(resumed[r], straight)
    assert int(open(f"{folder}/manager.pid").read()) != hung


def _train_fsdp(rank, world_size, overrides):
    """This rank's shards: local pieces of the weights and of their AdamW state."""
    from dist.train import train

    out = train(load_config(None, overrides))
    named, state = dict(out["model"].named_parameters()), out["optimizer"].state

    def local(v):
        return (v.to_local() if hasattr(v, "to_local") else v).detach().clone()

    return ({n: local(p) for n, p in named.items()},
            {n: {k: local(v) for k, v in state[p].items()} for n, p in named.items()}, out["start"])


@pytest.mark.slow
def test_fsdp_shards_resume_from_memory_bit_exact(tmp_path, job):
    ref, resumed = _uninterrupted_and_resumed(_train_fsdp, ["train.engine=fsdp", "train.steps=5"], tmp_path, job)
    for r in range(2):
        params, state, start = resumed[r]
        assert start in (2, 3)
        assert params.keys() == ref[r][0].keys() and state.keys() == ref[r][1].keys()
        for n in params:
            assert torch.equal(params[n], ref[r][0][n]), n
            for k in state[n]:
                assert torch.equal(state[n][k], ref[r][1][n][k]), (n, k)
