"""Fault injection for tests: SIGKILL one rank at a chosen point of the first generation of workers.

`fault.kill_step = N` (0 = off) kills rank `fault.kill_rank`, only while
TORCHELASTIC_RESTART_COUNT is 0 (so the restarted generation runs through),
at `fault.kill_phase`:
- "step": after step N;
- "copy": in the middle of copying snapshot N into host memory (a torn snapshot);
- "host": after step N, as if the whole host were lost: the host's snapshot
  manager is killed and its snapshot memory removed too.
SIGKILL, as a crashed host or the OOM killer would: no handler, no cleanup.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

from dist.runtime import restart_count


def maybe_kill(fault_cfg, rank: int, step: int, phase: str, host_dir: str | None = None) -> None:
    """Kill this process if the config asks for it at (`step`, `phase`); `step` counts completed steps."""
    wanted = fault_cfg.kill_phase if fault_cfg.kill_phase != "host" else "step"
    if not (fault_cfg.kill_step and step == fault_cfg.kill_step and phase == wanted
            and rank == fault_cfg.kill_rank and restart_count() == 0):
        return
    print(f"dist: fault injection: SIGKILL rank {rank} at step {step} ({fault_cfg.kill_phase}) t={time.time():.3f}",
          file=sys.stderr, flush=True)
    if fault_cfg.kill_phase == "host" and host_dir:
        from dist.fault.manager import manager_pid

        pid = manager_pid(host_dir)
        if pid:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(host_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)
