"""The snapshot manager: started once per host, respawned when killed alone (the segments survive it), and
nothing left in /dev/shm once the job (the process it watches) ends or its lease lapses."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from dist.fault.manager import alive, ensure_manager, manager_pid


def wait_until(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


@pytest.fixture
def agent():
    """Stands in for the torchrun agent the manager watches."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def folder():
    path = f"/dev/shm/dist-snap-test-{uuid.uuid4().hex[:8]}-h0"
    yield path
    pid = manager_pid(path)
    if pid:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(path))
    assert not os.path.exists(path)


def test_killed_manager_is_respawned_and_segments_survive(folder, agent):
    pid = ensure_manager(folder, watch_pid=agent.pid, lease_s=60)
    assert ensure_manager(folder, watch_pid=agent.pid, lease_s=60) == pid  # reused, not started twice
    with open(f"{folder}/r0.data0", "wb") as f:
        f.write(b"snapshot bytes")
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: manager_pid(folder) is None)
    assert open(f"{folder}/r0.data0", "rb").read() == b"snapshot bytes"
    new = ensure_manager(folder, watch_pid=agent.pid, lease_s=60)
    assert new != pid and alive(new)
    assert open(f"{folder}/r0.data0", "rb").read() == b"snapshot bytes"


def test_job_end_removes_the_segments(folder, agent):
    ensure_manager(folder, watch_pid=agent.pid, lease_s=60)
    open(f"{folder}/r0.data0", "wb").close()
    agent.kill()
    agent.wait()
    assert wait_until(lambda: not os.path.exists(folder))


def test_lapsed_lease_removes_the_segments(folder, agent):
    ensure_manager(folder, watch_pid=agent.pid, lease_s=0.5)
    open(f"{folder}/r0.data0", "wb").close()
    assert wait_until(lambda: not os.path.exists(folder))
