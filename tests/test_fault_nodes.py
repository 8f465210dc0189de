"""Two torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1, one rank each) form two hosts. The worker
of the second agent is SIGKILLed: that agent restarts with TORCHELASTIC_RESTART_COUNT 1, the first one only for
the membership change and keeps 0; the new generation must still connect, restore the snapshot and end
bit-identical to an uninterrupted run of the same two agents."""

import os
import subprocess
import sys
import uuid

import pytest

from tests.multirank import free_port
from tests.test_fault_restart import SMALL, assert_same_state, final_state, snap_dirs, wait_gone


def two_agents(tmp, name, overrides, *, timeout=240):
    """Both agents of one job; returns their CompletedProcess objects (agent 0 first)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [a for o in SMALL + [f"log.dir={tmp}/{name}/log", f"checkpoint.dir={tmp}/{name}/ck"] + overrides
            for a in ("--set", o)]
    port, rid = free_port(), f"nodes-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rid,
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "dist.launch", "train", *sets]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_agents_restart_after_a_killed_rank_bit_exact(tmp_path):
    before = snap_dirs()
    ref = two_agents(tmp_path, "ref", [])
    assert all(r.returncode == 0 for r in ref), "\n".join(r.stderr[-2000:] for r in ref)
    runs = two_agents(tmp_path, "run", ["fault.snapshot_every=1", "fault.kill_step=3", "fault.kill_rank=1",
                                        "log.level=info"])
    log = "\n".join(r.stderr for r in runs)
    assert all(r.returncode == 0 for r in runs), log[-4000:]
    assert "fault injection: SIGKILL" in log, log[-4000:]  # the worker did die and the agents restarted
    assert "restored snapshot" in log, log[-4000:]       # from host memory, not from scratch
    assert_same_state(final_state(f"{tmp_path}/run/ck/step-6"), final_state(f"{tmp_path}/ref/ck/step-6"))
    assert not wait_gone(snap_dirs() - before), "shared memory left behind after the job ended"
