"""The snapshot manager: one process per host that owns the host's snapshot memory.

    python -m dist.fault.manager --dir /dev/shm/dist-snap-RUN-h0 --watch AGENT_PID --lease 600

The first worker of a host starts it outside the workers' process session
(`ensure_manager`), so torchrun's restart of the workers, which kills their
sessions, leaves it and the segments running; the next generation finds it
through `dir/manager.pid` and reuses it. The workers map the segments
(files in `dir` on the /dev/shm tmpfs) and write them directly; the manager
keeps them until the job ends, then removes `dir`, so nothing is left in
/dev/shm:
- the job ended: the watched process (the torchrun agent of the host, the
  first worker's parent) is gone: success, restarts exhausted or a killed agent;
- the lease lapsed: no worker touched `dir/lease` for `--lease` seconds;
- SIGTERM or SIGINT.
It touches `dir/beat` every poll; a manager whose beat is older than
fault.manager_timeout_s is hung (stopped, swapped out, stuck in the kernel):
the workers do not trust its memory and replace it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

log = logging.getLogger("dist.fault")

PID_FILE = "manager.pid"
LEASE_FILE = "lease"
BEAT_FILE = "beat"  # the manager touches it every poll: its age says whether the manager still answers


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def manager_pid(folder: str) -> int | None:
    """The pid of the live manager of `folder`, or None."""
    try:
        with open(os.path.join(folder, PID_FILE)) as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def silent_for(folder: str) -> float:
    """Seconds since the manager of `folder` last showed it runs (inf when it never did)."""
    try:
        return max(0.0, time.time() - os.stat(os.path.join(folder, BEAT_FILE)).st_mtime)
    except FileNotFoundError:
        return float("inf")


def renew_lease(folder: str) -> None:
    try:
        os.utime(os.path.join(folder, LEASE_FILE))
    except FileNotFoundError:
        open(os.path.join(folder, LEASE_FILE), "w").close()


def ensure_manager(folder: str, *, watch_pid: int, lease_s: float, timeout_s: float = 20.0) -> int:
    """Start the manager of `folder` unless one runs; returns its pid. Called by the host's first worker."""
    pid = manager_pid(folder)
    if pid:
        return pid
    os.makedirs(folder, exist_ok=True)
    renew_lease(folder)
    stale = os.path.join(folder, PID_FILE)
    if os.path.exists(stale):
        os.remove(stale)
    proc = subprocess.Popen([sys.executable, "-m", "dist.fault.manager", "--dir", folder, "--watch", str(watch_pid),
                             "--lease", str(lease_s)], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if manager_pid(folder) == proc.pid:
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"snapshot manager for {folder} did not start (exit status {proc.poll()})")


def serve(folder: str, watch_pid: int, lease_s: float, poll_s: float = 0.2) -> str:
    """Hold `folder` until the job ends or the lease lapses; remove it; return why."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.append(signal.Signals(s).name))
    os.makedirs(folder, exist_ok=True)
    beat = os.path.join(folder, BEAT_FILE)
    open(beat, "w").close()  # before the pid file: a manager found running has beaten at least once
    tmp = os.path.join(folder, PID_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(folder, PID_FILE))
    why = ""
    while not why:
        try:
            os.utime(beat)
        except FileNotFoundError:
            open(beat, "w").close()
        time.sleep(poll_s)
        try:
            idle = time.time() - os.stat(os.path.join(folder, LEASE_FILE)).st_mtime
        except FileNotFoundError:
            idle = 0.0 if os.path.isdir(folder) else float("inf")
        if stop:
            why = stop[0]
        elif not alive(watch_pid):
            why = f"job ended (process {watch_pid} is gone)"
        elif idle > lease_s:
            why = f"lease lapsed ({idle:.0f} s without a worker)"
    shutil.rmtree(folder, ignore_errors=True)
    return why


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("--watch", type=int, required=True, help="pid whose exit ends the job (the torchrun agent)")
    p.add_argument("--lease", type=float, default=600.0)
    args = p.parse_args(argv)
    serve(args.dir, args.watch, args.lease)
    return 0


if __name__ == "__main__":
    sys.exit(main())
