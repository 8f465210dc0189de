"""Fault injection for tests: SIGKILL one rank at a chosen point of the first generation of workers.

`fault.kill_step = N` (0 = off) kills rank `fault.kill_rank` after step N
(`fault.kill_phase = "step"`) or in the middle of the snapshot copy of step N
("copy"), only while TORCHELASTIC_RESTART_COUNT is 0, so the restarted
generation runs through. SIGKILL, as a crashed host or the OOM killer would:
no handler, no cleanup, no flush.
"""

from __future__ import annotations

import os
import signal

from dist.runtime import restart_count


def maybe_kill(fault_cfg, rank: int, step: int, phase: str) -> None:
    """Kill this process if the config asks for it at (`step`, `phase`); `step` counts completed steps."""
    if (fault_cfg.kill_step and step == fault_cfg.kill_step and phase == fault_cfg.kill_phase
            and rank == fault_cfg.kill_rank and restart_count() == 0):
        os.kill(os.getpid(), signal.SIGKILL)
