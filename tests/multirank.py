"""The one multi-rank test helper: run a function on N spawned gloo ranks.

    from tests.multirank import run_ranks

    def _body(rank, world_size, x):          # top level, so spawn can pickle it
        import torch.distributed as dist
        t = torch.tensor([rank + x]); dist.all_reduce(t); return t.item()

    def test_sum():
        assert run_ranks(_body, 3, 1) == [6, 6, 6]

Each rank is a fresh process (spawn) with one torch thread, a gloo default
process group built on a FileStore, and a collective timeout; the parent waits
at most `timeout_s` for all of them, kills stragglers and raises with every
failing rank's traceback. Results must be picklable (detach tensors).

With `init_group=False` the ranks get the torchrun environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) instead, for tests of
code that builds its own process group (dist.runtime).
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import tempfile
import traceback

import multiprocessing as mp
import pickle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostReads:
    """Counts .tolist() / .item() calls made from Python while active: each one is a host sync per call on
    a GPU (the profiler shows .item() on CPU tensors but not .tolist())."""

    def __enter__(self):
        import torch

        self.calls, self._saved = [], (torch.Tensor.tolist, torch.Tensor.item)

        def counted(real):
            def read(t, *args):
                self.calls.append((real.__name__, tuple(t.shape)))
                return real(t, *args)
            return read

        torch.Tensor.tolist, torch.Tensor.item = (counted(f) for f in self._saved)
        return self

    def __exit__(self, *exc):
        import torch

        torch.Tensor.tolist, torch.Tensor.item = self._saved


def _child(fn, rank, world_size, args, store_path, env, init_group, collective_timeout_s, results):
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init_group:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group(
                "gloo",
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=collective_timeout_s),
            )
        try:
            out = fn(rank, world_size, *args)
        finally:
            if init_group and dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(out)))  # bytes: no shared-memory handles outlive the child
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0, init_group: bool = True,
              env: dict | None = None, collective_timeout_s: float | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on `world_size` ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    collective_timeout_s = collective_timeout_s or max(10.0, timeout_s / 2)
    with tempfile.TemporaryDirectory(prefix="multirank-") as tmp:
        port = free_port()
        procs = []
        for rank in range(world_size):
            rank_env = {
                "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                **(env or {}),
            }
            p = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, args, os.path.join(tmp, "store"), rank_env,
                      init_group, collective_timeout_s, results),
                daemon=True,
            )
            p.start()
            procs.append(p)

        import time

        deadline = time.monotonic() + timeout_s
        outs: dict[int, object] = {}
        errors: dict[int, str] = {}
        exited_quietly: set[int] = set()
        while len(outs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                # exited without reporting (segfault, os._exit, SIGKILL): seen on two quiet polls in a row
                gone = {r for r, p in enumerate(procs) if p.exitcode is not None and r not in outs and r not in errors}
                for r in gone & exited_quietly:
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} before reporting"
                exited_quietly = gone
                continue
            if ok:
                outs[rank] = pickle.loads(value)
            else:
                errors[rank] = value
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        missing = [r for r in range(world_size) if r not in outs and r not in errors]
        if errors or missing:
            lines = [f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)]
            if missing:
                lines.append(f"ranks {missing} did not finish within {timeout_s:.0f}s")
            raise RuntimeError("multi-rank run failed:\n" + "\n".join(lines))
        return [outs[r] for r in range(world_size)]
