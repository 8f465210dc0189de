"""Lost hosts, rebuilt from parity. Each rank is its own host (LOCAL_WORLD_SIZE = 1) with its own snapshot
manager and /dev/shm folder; a generation of 3 spawned gloo ranks is killed by losing one host (its worker
SIGKILLed, its manager killed, its snapshot memory removed), the next generation (TORCHELASTIC_RESTART_COUNT
= 1) rebuilds what was lost and must end bit-identical to an uninterrupted run. Losing more hosts than the
code survives is reported, never restored."""

import glob
import os
import shutil
import signal
import uuid

import pytest

from tests.test_fault_snapshot import _train, assert_same, job  # noqa: F401 - job is a fixture
from tests.multirank import run_ranks

SMALL = ["data.seq_len_min=32", "data.seq_len_max=160", "data.tokens_per_step=960", "train.warmup_steps=1",
         "train.deterministic=true", "log.level=warning", "train.steps=5", "runtime.threads=1"]


def run(job, overrides, tmp, generation=0):
    return run_ranks(_train, 3, SMALL + [f"log.dir={tmp}/log"] + overrides, init_group=False, timeout_s=200,
                     env={"TORCHELASTIC_RUN_ID": job, "TORCHELASTIC_RESTART_COUNT": str(generation),
                          "LOCAL_WORLD_SIZE": "1"})


def lose_host(job, host):
    """What losing a machine does to its snapshot memory: the manager dies, the segments are gone."""
    folder = f"/dev/shm/dist-snap-{job}-h{host}"
    try:
        os.kill(int(open(f"{folder}/manager.pid").read()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def straight3(tmp_path_factory):
    return run(f"ref-{uuid.uuid4().hex[:8]}", [], tmp_path_factory.mktemp("ref3"))[0]


def first_generation(job, parity, tmp):
    """Snapshots every step; host 1 is lost after step 3."""
    snap = ["fault.snapshot_every=1", f"fault.parity={parity}", "fault.group_size=3", "fault.kill_step=3",
            "fault.kill_rank=1", "fault.kill_phase=host", "runtime.timeout_s=20"]
    with pytest.raises(RuntimeError, match="multi-rank run failed"):
        run(job, snap, tmp)
    assert not os.path.exists(f"/dev/shm/dist-snap-{job}-h1")
    assert glob.glob(f"/dev/shm/dist-snap-{job}-h0/r0.head*.json")
    return snap


def shm_bytes(folder):
    """Bytes a host's snapshot folder holds in /dev/shm (pages written, not the files' nominal sizes)."""
    return sum(os.stat(os.path.join(folder, f)).st_blocks * 512 for f in os.listdir(folder))


def assert_memory_per_host(job, hosts, parity):
    """Each host holds two buffers of its rank's shard and of its parity share, m / k of it (group of 3:
    xor m = 1, k = 2; rs2 m = 2, k = 1). The shard by hand: the tiny model's fp32 weights and AdamW m, v,
    a third each (state replicated, one slice per rank), plus up to 256 KiB a buffer for the RNG states,
    the pickled layout and page rounding."""
    import math

    from dist.config import load_config
    from dist.memory import model_config, param_shapes

    n = sum(math.prod(s) for s in param_shapes(model_config(load_config(None, SMALL))))
    m = {"xor": 1, "rs2": 2}[parity]
    shard = 3 * 4 * n / 3
    want = 2 * shard * (1 + m / (3 - m))
    for h in hosts:
        used = shm_bytes(f"/dev/shm/dist-snap-{job}-h{h}")
        assert want <= used <= want + 2 * (1 + m / (3 - m)) * 256 * 1024, (h, used, want)


@pytest.mark.slow
@pytest.mark.parametrize("parity,extra_lost", [("xor", []), ("rs2", [2])])
def test_lost_hosts_are_rebuilt_from_parity_bit_exact(tmp_path, job, straight3, parity, extra_lost):
    snap = first_generation(job, parity, tmp_path)
    assert_memory_per_host(job, [0, 2], parity)
    for h in extra_lost:
        lose_host(job, h)
    resumed = run(job, snap, tmp_path, generation=1)
    assert resumed[0][2] in (2, 3)  # resumed from memory, not from step 0
    for r in range(3):
        assert_same(resumed[r], straight3)


@pytest.mark.slow
def test_two_lost_hosts_in_an_xor_group_are_reported_not_restored(tmp_path, job):
    snap = first_generation(job, "xor", tmp_path)
    lose_host(job, 2)
    with pytest.raises(RuntimeError, match=r"lost ranks \[1, 2\], fault.parity = 'xor' survives 1 per group; "
                                           r"no disk checkpoint to fall back to"):
        run(job, snap, tmp_path, generation=1)
