"""The snapshot engine: after the optimizer step, this rank's training state into host shared memory.

    snaps = Snapshots(cfg, rt, model, engine)     # every rank, after the engine is built (builds groups)
    start = snaps.restore(disk_step)              # on every worker start: the step to resume at, or None
    for step in ...:
        ...forward/backward...
        snaps.wait_copied()                       # the copy of the last snapshot must be done before
        engine.step(lr)                           #   the optimizer changes the tensors it reads
        snaps.after_step(step + 1)                # every fault.snapshot_every steps: start a snapshot
    snaps.close()

What a rank stores (its blob), per snapshot: with train.engine = "torch"
(state replicated on every rank) a 1/world slice of the model and AdamW
state; with "deepspeed" its ZeRO partition (AdamW state and fp32 master
weights, from which the model follows); and its RNG states (torch CPU and
CUDA, numpy, python) and the data position (the step). Blob layout:
[replicated slice | local tensors | pickled tree | 8-byte tree length].

Double buffer: snapshot s goes to buffer s % 2 while s - 1 stays committed
in the other. A background thread (on GPU: a side CUDA stream into pinned
memory) copies the tensors while the next step's forward and backward run,
checksums the blob, computes the parity group's erasure code by
moving pieces between the group's ranks (dist.fault.codec's rotated
placement) and then joins an all-gather of every rank's sizes and checksums:
only after it, i.e. once every rank has copied, does a rank write its header
`r{rank}.head{b}.json` (atomic rename), which marks snapshot s committed.
A rank starts overwriting buffer b only after the previous snapshot has
committed everywhere, so the newest version committed on every rank is
always still in memory, and a torn copy has no header.

Segments live in /dev/shm/dist-snap-{run id}-h{host}/, owned by the host's
snapshot manager (dist.fault.manager), so a killed worker loses nothing and
nothing outlives the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import signal
import threading
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist

from dist.fault.codec import Code, TooManyLosses, make_code, pieces
from dist.fault.inject import maybe_kill
from dist.fault.manager import alive, ensure_manager, manager_pid, renew_lease, silent_for

log = logging.getLogger("dist.fault")

SHM_ROOT = "/dev/shm"
ALIGN = 8
FORMAT = 1


class SnapshotError(ValueError):
    """No usable snapshot: too many losses, or what is there fails its checks."""


def run_id() -> str:
    """The job's id: torchrun's rendezvous id (a fresh uuid under --standalone), else the parent's pid."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID") or f"ppid{os.getppid()}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in rid)


def host_dir(host: int) -> str:
    return os.path.join(SHM_ROOT, f"dist-snap-{run_id()}-h{host}")


def fingerprint(cfg, world_size: int, local_world: int, engine_name: str) -> str:
    """What a snapshot must match to be loaded: model, data, optimizer settings, world and code layout."""
    from dist.config import to_dict

    d = to_dict(cfg)
    keep = {"model": d["model"], "data": d["data"], "sp": d["sp"],
            "train": {k: v for k, v in d["train"].items() if k not in ("steps", "deterministic")},
            "fault": {"parity": cfg.fault.parity, "group_size": cfg.fault.group_size},
            "world_size": world_size, "local_world_size": local_world, "engine": engine_name, "format": FORMAT}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def parity_groups(world: int, local_world: int, parity: str, group_size: int) -> tuple[Code, list[list[int]]]:
    """The code and the parity groups (global ranks, member order): the same local rank on group_size
    consecutive hosts. One host, or parity "none": groups of one rank, no parity."""
    hosts = world // local_world
    if parity == "none" or hosts == 1:
        return make_code("none", 1), [[r] for r in range(world)]
    if hosts % group_size:
        raise ValueError(f"config key 'fault.group_size' ({group_size}) must divide the number of hosts ({hosts})")
    code = make_code(parity, group_size)
    groups = [[(g * group_size + i) * local_world + lr for i in range(group_size)]
              for g in range(hosts // group_size) for lr in range(local_world)]
    return code, groups


# ---------------------------------------------------------------- state <-> blob

def _flatten(obj, out: list):
    """Replace every tensor in nested dicts/lists/tuples by ("__tensor__", index into out)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("__tensor__", len(out) - 1)
    if isinstance(obj, dict):
        return {k: _flatten(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_flatten(v, out) for v in obj)
    return obj


def _unflatten(obj, tensors: list):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
        return tensors[obj[1]]
    if isinstance(obj, dict):
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unflatten(v, tensors) for v in obj)
    return obj


def _layout(tensors: list[torch.Tensor]) -> tuple[list[tuple[str, list[int], int]], int]:
    """[(dtype, shape, byte offset)] with 8-byte aligned offsets, and the total length."""
    specs, pos = [], 0
    for t in tensors:
        specs.append((str(t.dtype).removeprefix("torch."), list(t.shape), pos))
        pos += t.numel() * t.element_size()
        pos += -pos % ALIGN
    return specs, pos


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor, cuda: bool) -> None:
    """dst[:] = src, uint8: on GPU an async copy on the current (side) stream into pinned memory; on CPU
    numpy's plain memcpy (faster than torch's copy_ of bytes on CPU)."""
    if cuda:
        dst.copy_(src, non_blocking=True)
    else:
        np.copyto(dst.numpy(), src.numpy())


def _tensors_from(buf: torch.Tensor, specs) -> list[torch.Tensor]:
    out = []
    for dtype, shape, off in specs:
        dt = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dt).element_size()
        out.append(buf[off:off + n].clone().view(dt).reshape(shape))
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().numpy().tobytes(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda"]), dtype=torch.uint8))


def all_gather(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    """out [world * n] <- every rank's inp [n] (torch 2.13 renamed all_gather_into_tensor)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


CHECK_WORDS = 1 << 17  # checksum rows of 1 MiB


def checksum(a: np.ndarray) -> int:
    """A 32-bit checksum of a uint8 array: the wrapping sum of the 64-bit words of each 1 MiB row, then a
    CRC-32 of those sums and the tail. A changed, lost or moved row, or any single changed word, changes
    it; it runs at memory speed (zlib.crc32 over the whole blob runs at about 1 GB/s)."""
    n = len(a) - len(a) % 8
    words = a[:n].view(np.uint64)
    rows = len(words) // CHECK_WORDS
    sums = words[:rows * CHECK_WORDS].reshape(rows, CHECK_WORDS).sum(axis=1, dtype=np.uint64)
    rest = words[rows * CHECK_WORDS:].sum(dtype=np.uint64)
    return zlib.crc32(a[n:], zlib.crc32(rest.tobytes(), zlib.crc32(sums.tobytes())))


def process_start_time() -> float:
    """When this process was started, in seconds since the epoch (from /proc, to 10 ms)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks since boot
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


# ---------------------------------------------------------------- shared-memory segments

class Segment:
    """A file in the host's /dev/shm folder mapped as a uint8 tensor (pinned for CUDA copies on GPUs)."""

    def __init__(self, path: str, nbytes: int, *, pin: bool = False):
        self.path, self.nbytes = path, nbytes
        with open(path, "a+b") as f:
            if os.fstat(f.fileno()).st_size < nbytes:
                os.ftruncate(f.fileno(), nbytes)
        self.t = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]
        if pin and nbytes:
            torch.cuda.cudart().cudaHostRegister(self.t.data_ptr(), nbytes, 0)

    @property
    def np(self) -> np.ndarray:
        return self.t.numpy()


def read_file(path: str, nbytes: int) -> np.ndarray | None:
    """The first nbytes of a segment, or None if it is missing or short."""
    try:
        if os.path.getsize(path) < nbytes:
            return None
        return np.fromfile(path, dtype=np.uint8, count=nbytes)
    except OSError:
        return None


# ---------------------------------------------------------------- the engine

class Snapshots:
    def __init__(self, cfg, rt, model, engine):
        self.cfg, self.rt, self.model, self.engine = cfg, rt, model, engine
        self.every = cfg.fault.snapshot_every
        self.rank, self.world = rt.rank, rt.world_size
        self.local_world = rt.local_world_size
        self.host, self.local_rank = divmod(self.rank, self.local_world)  # torchrun numbers ranks host by host
        self.code, self.groups = parity_groups(self.world, self.local_world, cfg.fault.parity, cfg.fault.group_size)
        if cfg.fault.parity != "none" and self.code.m == 0 and self.rank == 0:
            log.warning("fault: one host: snapshots survive killed workers, not the loss of the host "
                        "(fault.parity needs several hosts)")
        self.group = next(g for g in self.groups if self.rank in g)
        self.member = self.group.index(self.rank)
        self.fp = fingerprint(cfg, self.world, self.local_world, engine.name)
        self.dir = host_dir(self.host)
        self.cuda = rt.device.type == "cuda"
        # Every rank builds every group, in the same order (torch.distributed requires it).
        self.world_pg = dist.new_group(list(range(self.world)), timeout=rt.timeout)
        self.group_pg = None
        for g in self.groups:
            pg = dist.new_group(g, timeout=rt.timeout) if len(g) > 1 else None
            if g is self.group:
                self.group_pg = pg
        self.timings: dict = {}   # restore's phases (seconds): scan, fetch, decode, manifests, load
        self.version = 0          # snapshots taken by this process generation (after restore: the restored one)
        self.data = [None, None]  # Segment per buffer
        self.parity = [None, None]
        self.thread: threading.Thread | None = None
        self.copied = threading.Event()
        self.copied.set()
        self.error: BaseException | None = None
        self.stream = torch.cuda.Stream(device=rt.device) if self.cuda else None
        self.thread_cpu_s = 0.0   # CPU seconds the snapshot threads used, all snapshots together
        self.hung_manager: int | None = None  # pid of this host's manager when it stopped answering
        os.makedirs(self.dir, exist_ok=True)
        self._keep_manager()

    # ------------------------------------------------------------ files

    def _path(self, kind: str, b: int, rank: int | None = None) -> str:
        ext = ".json" if kind == "head" else ""
        return os.path.join(self.dir, f"r{self.rank if rank is None else rank}.{kind}{b}{ext}")

    def _keep_manager(self) -> None:
        """The host's first worker (re)starts the manager when none runs; every worker renews the lease."""
        if self.local_rank == 0 and manager_pid(self.dir) is None:
            if os.path.exists(os.path.join(self.dir, "manager.pid")):
                log.warning("fault: the snapshot manager of host %d is gone: starting a new one", self.host)
            ensure_manager(self.dir, watch_pid=os.getppid(), lease_s=self.cfg.fault.lease_s)
        renew_lease(self.dir)

    # ------------------------------------------------------------ taking snapshots

    def wait_copied(self) -> None:
        """Block until the in-flight snapshot has read the live tensors (call before the optimizer step)."""
        self.copied.wait()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise RuntimeError(f"snapshot failed on rank {self.rank}: {self.error}") from self.error

    def after_step(self, step: int) -> None:
        """`step` steps are done: start snapshot of them if it is due."""
        if not self.every or step % self.every:
            return
        self.join()  # the previous snapshot committed everywhere: its buffer's neighbour may be overwritten
        self._keep_manager()
        self.version += 1
        b = self.version % 2
        head = self._path("head", b)
        if os.path.exists(head):
            os.remove(head)  # buffer b is about to change: no longer a committed snapshot
        rep = {"model": self.model.state_dict(), "optimizer": self.engine.optimizer_state()} \
            if self.engine.replicated else {}
        local = {} if self.engine.replicated else {"optimizer": self.engine.optimizer_state()}
        rep_t, loc_t = [], []
        tree = {"rep": _flatten(rep, rep_t), "local": _flatten(local, loc_t), "rng": rng_state(), "step": step}
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()  # the side stream waits for the optimizer step's kernels
        self.copied.clear()
        self.thread = threading.Thread(target=self._run, args=(b, step, tree, rep_t, loc_t, event),
                                       name="dist-snapshot", daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._raise()

    def close(self) -> None:
        """Let the in-flight snapshot commit (collective: every rank calls it at the end of training)."""
        self.join()

    def _run(self, b, step, tree, rep_t, loc_t, event):
        with contextlib.suppress(OSError):  # lowest CPU priority: the trainer's threads come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        c0 = time.thread_time()
        try:
            nbytes = self._copy(b, step, tree, rep_t, loc_t, event)
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            self.error = e
            self.copied.set()
            return
        self.copied.set()
        try:
            self._encode_and_commit(b, step, nbytes)
        except BaseException as e:  # noqa: BLE001
            self.error = e
        self.thread_cpu_s += time.thread_time() - c0

    def _copy(self, b, step, tree, rep_t, loc_t, event) -> int:
        rep_specs, rep_total = _layout(rep_t)
        loc_specs, loc_total = _layout(loc_t)
        per = -(-rep_total // self.world)
        lo, hi = min(self.rank * per, rep_total), min((self.rank + 1) * per, rep_total)
        tree = {**tree, "rep_specs": rep_specs, "rep_total": rep_total, "rep_range": (lo, hi), "loc_specs": loc_specs,
                "fingerprint": self.fp}
        meta = pickle.dumps(tree, protocol=pickle.HIGHEST_PROTOCOL)
        size = (hi - lo) + loc_total + len(meta) + 8
        seg = self.data[b]
        if seg is None or seg.nbytes < size:
            self.data[b] = seg = Segment(self._path("data", b), size + (1 << 16), pin=self.cuda)
        out = seg.t
        moved, half = 0, (hi - lo + loc_total) // 2
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            if event is not None:
                self.stream.wait_event(event)
            for t, (_, _, off) in zip(rep_t, rep_specs):
                n = t.numel() * t.element_size()
                a, z = max(off, lo), min(off + n, hi)
                if a < z:
                    _copy_bytes(out[a - lo:z - lo], _as_bytes(t)[a - off:z - off], self.cuda)
                    moved += z - a
                    if moved >= half:
                        maybe_kill(self.cfg.fault, self.rank, step, "copy")  # tests: a torn snapshot
            base = hi - lo
            for t, (_, _, off) in zip(loc_t, loc_specs):
                n = t.numel() * t.element_size()
                _copy_bytes(out[base + off:base + off + n], _as_bytes(t), self.cuda)
                moved += n
                if moved >= half:
                    maybe_kill(self.cfg.fault, self.rank, step, "copy")
            if self.cuda:
                self.stream.synchronize()
        tail = base + loc_total
        out[tail:tail + len(meta)] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        out[tail + len(meta):size] = torch.frombuffer(bytearray(len(meta).to_bytes(8, "little")), dtype=torch.uint8)
        return size

    def _encode_and_commit(self, b, step, nbytes):
        blob = self.data[b].np[:nbytes]
        data_crc = checksum(blob)
        plen, parity_crc = 0, 0
        if self.code.m:
            sizes = torch.zeros(len(self.group), dtype=torch.int64)
            all_gather(sizes, torch.tensor([nbytes], dtype=torch.int64), group=self.group_pg)
            plen = self.code.piece_len(int(sizes.max()))
            par = self.parity[b]
            if par is None or par.nbytes != self.code.m * plen:
                self.parity[b] = par = Segment(self._path("parity", b), self.code.m * plen)
            self._encode(pieces(blob, plen, self.code.k), plen, par.np)
            parity_crc = checksum(par.np)
        mine = torch.tensor([nbytes, data_crc, parity_crc, plen], dtype=torch.int64)
        table = torch.zeros(self.world, 4, dtype=torch.int64)
        all_gather(table, mine[None], group=self.world_pg)  # every rank has copied: commit
        head = {"format": FORMAT, "fingerprint": self.fp, "version": self.version, "step": step, "rank": self.rank,
                "buffer": b, "table": table.tolist()}
        tmp = self._path("head", b) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(head, f)
        os.replace(tmp, self._path("head", b))

    def _encode(self, my_pieces: list[np.ndarray], plen: int, parity_out: np.ndarray) -> None:
        """Parity block t of the stripe this member holds it for: its k pieces come from the stripe's data
        members (point-to-point on the parity group), then encode."""
        code, G, me = self.code, len(self.group), self.member
        for t in range(code.m):
            ops, recv = [], {}
            for r in range(G):  # I send my piece of stripe (r - t) to its t-th holder r
                j = (r - t) % G
                if r != me and me in code.data_members(j):
                    ops.append(dist.P2POp(dist.isend, torch.from_numpy(my_pieces[code.piece_of(me, j)]),
                                          self.group[r], self.group_pg))
            j = (me - t) % G
            for x in code.data_members(j):
                if x != me:
                    recv[x] = np.empty(plen, dtype=np.uint8)
                    ops.append(dist.P2POp(dist.irecv, torch.from_numpy(recv[x]), self.group[x], self.group_pg))
            if ops:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            block = code.encode([recv[x] for x in code.data_members(j)])[t]
            parity_out[t * plen:(t + 1) * plen] = block

    # ------------------------------------------------------------ recovery

    def _scan(self) -> dict:
        """This rank's committed snapshots in host memory: {version: entry}, each checked (fingerprint,
        checksums). Anything that fails a check is reported in one line and left out."""
        found = {}
        pid, silent = manager_pid(self.dir), silent_for(self.dir)
        self.hung_manager = pid if pid is not None and silent > self.cfg.fault.manager_timeout_s else None
        if self.hung_manager:
            if self.local_rank == 0:
                log.warning("fault: the snapshot manager of host %d (pid %d) has not answered for %.0f s "
                            "(fault.manager_timeout_s = %g): its snapshots are not loaded", self.host, pid, silent,
                            self.cfg.fault.manager_timeout_s)
            return found
        for b in (0, 1):
            path = self._path("head", b)
            if not os.path.exists(path):
                continue
            try:
                with open(path) as f:
                    head = json.load(f)
                table = head["table"]
            except (OSError, ValueError, KeyError):
                log.warning("fault: %s is unreadable: snapshot not loaded", path)
                continue
            if head.get("fingerprint") != self.fp or len(table) != self.world:
                log.warning("fault: %s was written by another job or config: snapshot not loaded", path)
                continue
            nbytes, data_crc, parity_crc, plen = table[self.rank]
            data = read_file(self._path("data", b), nbytes)
            data_ok = data is not None and checksum(data) == data_crc
            if data is not None and not data_ok:
                log.warning("fault: %s fails its checksum: snapshot not loaded", self._path("data", b))
            parity_ok = True
            if self.code.m:
                par = read_file(self._path("parity", b), self.code.m * plen)
                parity_ok = par is not None and checksum(par) == parity_crc
            found[head["version"]] = {"step": head["step"], "buffer": b, "data": data_ok, "parity": parity_ok,
                                      "table": table}
        return found

    def restore(self, disk_step: int = -1) -> int | None:
        """Collective, on every worker start. Load the newest snapshot every rank committed (rebuilding lost
        blobs from parity) if it is newer than `disk_step`; return its step, or None (start fresh or from the
        disk checkpoint). SnapshotError when snapshots exist but none can be restored and there is no
        disk checkpoint to fall back to."""
        t0 = time.perf_counter()
        mine = self._scan()
        self.timings = {"scan_s": time.perf_counter() - t0, "fetch_s": 0.0, "decode_s": 0.0}
        manifests: list = [None] * self.world
        t0 = time.perf_counter()
        dist.all_gather_object(manifests, {v: {k: e[k] for k in ("step", "data", "parity", "table")}
                                           for v, e in mine.items()})
        self.timings["manifests_s"] = time.perf_counter() - t0
        if self.hung_manager and self.local_rank == 0:  # every local rank has scanned: replace it
            with contextlib.suppress(OSError):
                os.kill(self.hung_manager, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while alive(self.hung_manager) and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, "manager.pid"))
            for b in (0, 1):
                for r in range(self.rank, self.rank + self.local_world):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._path("head", b, r))
            self._keep_manager()
        versions = sorted({v for m in manifests for v in m}, reverse=True)
        if not versions:
            return None
        step = self._restore(manifests, versions, mine, disk_step)
        if step is None:  # starting over: what is in memory must never be taken for a newer snapshot
            for b in (0, 1):
                if os.path.exists(self._path("head", b)):
                    os.remove(self._path("head", b))
            self.version = versions[0]
        return step

    def _restore(self, manifests, versions, mine, disk_step) -> int | None:
        why = ""
        for v in versions:
            lost = {}
            for gi, g in enumerate(self.groups):
                gone = [i for i, r in enumerate(g) if not (v in manifests[r] and manifests[r][v]["data"]
                                                           and manifests[r][v]["parity"])]
                if len(gone) > self.code.m:
                    why = (f"snapshot {v}: parity group {gi} lost ranks {[g[i] for i in gone]}, fault.parity = "
                           f"{self.cfg.fault.parity!r} survives {self.code.m} per group")
                    break
                if gone:
                    lost[gi] = gone
            else:
                step = next(m[v]["step"] for m in manifests if v in m)
                if step <= disk_step:
                    return None
                table = next(m[v]["table"] for m in manifests if v in m)
                self._load(v, mine.get(v), lost, table)
                self.version = v
                times = torch.tensor(list(self.timings.values()), dtype=torch.float64)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank sets each phase
                if self.rank == 0:
                    rebuilt = sorted(self.groups[gi][i] for gi, gone in lost.items() for i in gone)
                    rdzv = self.rt.rendezvous_at
                    log.info("fault: restored snapshot %d (step %d) from host memory%s | %s | started=%.3f "
                             "rendezvous=%.3f,%.3f t=%.3f", v, step,
                             f", ranks {rebuilt} rebuilt from parity" if rebuilt else "",
                             " ".join(f"{k}={x:.3f}" for k, x in zip(self.timings, times.tolist())),
                             process_start_time(), rdzv[0], rdzv[1], time.time())
                return step
        if disk_step >= 0:
            if self.rank == 0:
                log.warning("fault: %s; falling back to the disk checkpoint of step %d", why, disk_step)
            return None
        raise SnapshotError(f"{why}; no disk checkpoint to fall back to (checkpoint.dir with checkpoint.resume = "
                            f"\"latest\"): not restoring")

    def _load(self, v, entry, lost: dict, table) -> None:
        nbytes, data_crc = table[self.rank][0], table[self.rank][1]
        blob = read_file(self._path("data", entry["buffer"]), nbytes) if entry and entry["data"] else None
        blob = self._rebuild(v, lost, table, blob)
        t0 = time.perf_counter()
        if checksum(blob) != data_crc:
            raise SnapshotError(f"snapshot {v} of rank {self.rank} fails its checksum after rebuilding: not loaded")
        buf = torch.from_numpy(blob.copy())
        meta_len = int.from_bytes(blob[nbytes - 8:nbytes].tobytes(), "little")
        tree = pickle.loads(blob[nbytes - 8 - meta_len:nbytes - 8].tobytes())
        if tree["fingerprint"] != self.fp:
            raise SnapshotError(f"snapshot {v} was written by another job or config: not loaded")
        lo, hi = tree["rep_range"]
        rep_t = []
        if tree["rep_total"]:
            per = -(-tree["rep_total"] // self.world)
            mine = torch.zeros(per, dtype=torch.uint8)
            mine[:hi - lo] = buf[:hi - lo]
            full = torch.zeros(per * self.world, dtype=torch.uint8)
            all_gather(full, mine)
            rep_t = _tensors_from(full, tree["rep_specs"])
        loc_t = _tensors_from(buf[hi - lo:], tree["loc_specs"])
        rep, local = _unflatten(tree["rep"], rep_t), _unflatten(tree["local"], loc_t)
        if "model" in rep:
            self.model.load_state_dict(rep["model"])
        self.engine.load_optimizer_state(rep.get("optimizer") or local["optimizer"])
        set_rng_state(tree["rng"])
        self.timings["load_s"] = time.perf_counter() - t0

    def _rebuild(self, v, lost: dict, table, blob):
        """Move the blocks of lost members' stripes to them (collective over every rank) and decode."""
        code, ops, got = self.code, [], {}
        by_rank = {r: entry for r, entry in enumerate(table)}
        plen = None
        mine_pieces = par = None
        for gi, gone in sorted(lost.items()):
            g = self.groups[gi]
            plen = max(by_rank[r][3] for r in g)
            for x in gone:
                for j in code.stripes_of(x):
                    members = code.data_members(j)
                    avail = [(i, y) for i, y in enumerate(members) if y not in gone]
                    avail += [(code.k + t, y) for t, y in enumerate(code.holders(j)) if y not in gone]
                    for blk, y in avail[:code.k]:
                        if g[x] == self.rank:
                            got.setdefault(j, {})[blk] = np.empty(plen, dtype=np.uint8)
                            ops.append(dist.P2POp(dist.irecv, torch.from_numpy(got[j][blk]), g[y]))
                        elif g[y] == self.rank:
                            if blk < code.k:
                                if mine_pieces is None:
                                    mine_pieces = pieces(blob, plen, code.k)
                                send = mine_pieces[code.piece_of(y, j)]
                            else:
                                if par is None:
                                    par = read_file(self._path("parity", v % 2), code.m * plen)
                                t = blk - code.k
                                send = par[t * plen:(t + 1) * plen]
                            ops.append(dist.P2POp(dist.isend, torch.from_numpy(np.ascontiguousarray(send)), g[x]))
        t0 = time.perf_counter()
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        self.timings["fetch_s"] = time.perf_counter() - t0
        if blob is not None:
            return blob
        if not got:
            raise SnapshotError(f"snapshot {v} of rank {self.rank} is missing and no parity covers it")
        t0 = time.perf_counter()
        x = self.member
        out = [code.decode(got[j])[code.data_members(j).index(x)] for j in code.stripes_of(x)]
        blob = np.concatenate(out)[:table[self.rank][0]]
        self.timings["decode_s"] = time.perf_counter() - t0
        return blob


__all__ = ["Snapshots", "SnapshotError", "TooManyLosses", "host_dir", "run_id", "parity_groups"]
