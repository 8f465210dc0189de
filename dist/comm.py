"""THE communication helper: point-to-point exchanges, the twin group, collectives with byte counts.

Everything in `dist` that moves tensors between ranks outside of plain DDP goes through here, so
that one place knows:

- how a step's messages are posted at once (`Exchange`: batched isend/irecv, started before the
  step's compute and waited after it, so the transfer overlaps the compute);
- how both directions of a link are kept busy on gloo: each direction of a bidirectional exchange
  rides its own process group (`twin_group(group)`; gloo serialises a send and a receive with the
  same peer on one group, see NOTES);
- how long to wait for a peer (`timeout()`; a dead peer raises instead of hanging);
- how many bytes each rank sent, per label (`counters`), so tests can assert communication volume;
- how ranks on one host talk: over shared memory (`_Shm`), not gloo's TCP loopback, for CPU tensors
  on gloo groups (one copy in, one copy out, no socket; what NCCL does within a node, for CPU runs). $DIST_SHM=0 turns it off; ranks in different network namespaces (the testbed's
  hosts) or machines never use it.

Peers are given as ranks *within* `group` (group order); `None` means the default group.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import logging
import os
import platform
import secrets
import socket
import threading
import time
from collections import Counter, deque

import torch
import torch.distributed as dist

_TWINS: dict = {}
log = logging.getLogger(__name__)


def timeout() -> datetime.timedelta | None:
    """Per-message wait limit: $DIST_COMM_TIMEOUT_S seconds, else (unset or 0) the process group's own timeout."""
    value = float(os.environ.get("DIST_COMM_TIMEOUT_S") or 0)
    return datetime.timedelta(seconds=value) if value > 0 else None


_GROUP_TIMEOUTS: dict = {}


def _group_timeout(group) -> datetime.timedelta | None:
    """The process group's own timeout (what its gloo messages would wait), None if unknown; looked
    up once per group."""
    pg = group if group is not None else dist.group.WORLD
    if pg not in _GROUP_TIMEOUTS:
        try:
            _GROUP_TIMEOUTS[pg] = pg._get_backend(torch.device("cpu")).options._timeout
        except (AttributeError, RuntimeError):  # a private API: torch's default applies then
            _GROUP_TIMEOUTS[pg] = None
    return _GROUP_TIMEOUTS[pg]


class Counters:
    """Bytes and messages this rank sent, per label ("q", "kv", "out", ...), and wait_s, the seconds it
    spent blocked in Exchange.wait and in the collectives below (communication that compute did not
    hide). Reset with `reset()`."""

    def __init__(self):
        self.bytes = Counter()
        self.messages = Counter()
        self.wait_s = 0.0

    def add(self, label: str, nbytes: int, messages: int = 1) -> None:
        self.bytes[label] += int(nbytes)
        self.messages[label] += messages

    def reset(self) -> None:
        self.bytes.clear()
        self.messages.clear()
        self.wait_s = 0.0

    def total(self) -> int:
        return sum(self.bytes.values())


counters = Counters()


@contextlib.contextmanager
def _blocked():
    """Time the enclosed wait into counters.wait_s."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        counters.wait_s += time.perf_counter() - t0


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    """This process's rank in `group`; ValueError if it is not a member."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this rank is not a member of the process group passed as `group`")
    return rank


def global_rank(group, rank_in_group: int) -> int:
    if group is None or group is dist.group.WORLD:
        return rank_in_group
    return dist.get_global_rank(group, rank_in_group)


def group_ranks(group=None) -> list[int]:
    """Global ranks of `group` in group order (the ring order)."""
    return [global_rank(group, i) for i in range(group_size(group))]


def _known_group_count() -> int:
    world = getattr(dist.distributed_c10d, "_world", None)
    return len(getattr(world, "pg_names", {})) if world is not None else 0


def twin_group(group=None):
    """A second process group with the same ranks as `group`, created once and cached.

    Only the members call this (new_group with use_local_synchronization), all of them at the same
    point of the program, as with any collective. torch names such groups by hashing the ranks
    with the number of groups each rank knows; when members know different numbers of groups
    (some created subgroups others are not in) the names would differ and creation would hang,
    so the counts are compared first and, if they differ, `group` itself serves as its own twin
    (correct, only slower on gloo) with a warning.
    """
    key = group if group is not None else dist.group.WORLD
    twin = _TWINS.get(key)
    if twin is None and dist.get_backend(group) != "gloo":
        twin = _TWINS[key] = key  # NCCL and others run both directions of one communicator at once
    if twin is None:
        count = torch.tensor([_known_group_count()], dtype=torch.int64)
        counts = [torch.zeros_like(count) for _ in range(group_size(group))]
        dist.all_gather(counts, count, group=group)
        if len({int(c) for c in counts}) > 1:
            log.warning("twin_group: ranks of the group know different numbers of process groups; "
                        "both directions share one group (create subgroups on every rank to avoid this)")
            twin = key
        else:
            twin = dist.new_group(group_ranks(group), use_local_synchronization=True)
        _TWINS[key] = twin
    return twin


def direction_group(group, src: int, dst: int):
    """The group that carries messages from group rank src to dst: `group` upwards, its twin downwards.

    So each direction of every link has its own group (and gloo connection), and messages between
    one ordered pair of ranks always ride the same group, in order.
    """
    return group if src < dst else twin_group(group)


# ----------------------------------------------------------------------------------------------
# shared-memory transport for ranks on one host
#
# Every ordered pair (src, dst) of same-host ranks gets one ring buffer in a /dev/shm file that src
# writes and dst reads: a control page (int64 slots: [0] `written`, set by src; [8] `read`, set by
# dst, a cache line apart; [16] capacity) and `capacity` data bytes. A message is a 64-byte header
# (group key, tag, nbytes) then its bytes, padded to 64; messages longer than the ring stream
# through it. Sends are copied in when posted (as far as there is room), receives are copied out in
# `wait()`, and a helper thread keeps both moving while the rank is elsewhere; any wait advances
# every pending message of the process, so exchanges waited in any order cannot deadlock. A message
# that arrives before its receive is posted stays in the ring, or is parked (copied aside) when a
# later message from the same peer is wanted: gloo's per-(group, tag) order, exactly. Ordering of
# the copy before the counter update relies on x86's total store order, so the transport is x86-only.

_SHM_HEADER = 4096
_MSG_HEADER = 64


def _shm_enabled() -> bool:
    return (os.environ.get("DIST_SHM", "1") != "0" and os.path.isdir("/dev/shm")
            and platform.machine().lower() in ("x86_64", "amd64"))


def _host_key() -> int:
    """Equal for two processes iff they share a kernel, /dev/shm, and network/pid/ipc namespaces."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts += [str(os.stat(f"/proc/self/ns/{ns}").st_ino) for ns in ("net", "pid", "ipc")]
        parts.append(str(os.stat("/dev/shm").st_dev))
    except OSError:
        parts.append(str(os.getpid()))  # cannot tell: treat as a host of its own
    return int.from_bytes(hashlib.blake2b("|".join(parts).encode(), digest_size=7).digest(), "little")


def _shm_capacity(segments: int) -> int:
    """Data bytes of one ring: $DIST_SHM_MB (default 16 MiB), at most 1/4 of free /dev/shm shared by
    `segments` rings, at least 256 KiB; a multiple of 4096."""
    want = int(float(os.environ.get("DIST_SHM_MB", "16")) * (1 << 20))
    st = os.statvfs("/dev/shm")
    room = st.f_bavail * st.f_frsize // (4 * max(1, segments))
    return max(256 << 10, min(want, room)) // 4096 * 4096


class _Ring:
    """One direction of one same-host pair: a mapped /dev/shm file (see the section comment)."""

    def __init__(self, path: str, capacity: int | None):
        if capacity is not None:  # the writer creates it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, _SHM_HEADER + capacity)  # room now, never SIGBUS later
            finally:
                os.close(fd)
        size = os.path.getsize(path)
        self.buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self.ctl = self.buf[:_SHM_HEADER].view(torch.int64)  # [0] written, [8] read, [16] capacity
        if capacity is not None:
            self.ctl[16] = capacity
        self.capacity = int(self.ctl[16])
        assert self.capacity == size - _SHM_HEADER
        self.data = self.buf[_SHM_HEADER:]
        self.pos = 0  # our own counter (written for the writer, read for the reader)
        self.queue: deque = deque()  # writer: _Op sends in order
        self.current = None  # reader: (destination uint8 view, done callback, nbytes) being filled
        self.got = 0  # reader: bytes of `current` copied

    def _copy(self, t: torch.Tensor, start: int, n: int, to_ring: bool) -> None:
        """Copy bytes t[start:start + n] to (or from) the ring at self.pos, wrapping at its end."""
        done = 0
        while done < n:
            off = (self.pos + done) % self.capacity
            k = min(n - done, self.capacity - off)
            ring, mine = self.data[off:off + k], t[start + done:start + done + k]
            (ring if to_ring else mine).copy_(mine if to_ring else ring)
            done += k

    def write(self) -> bool:
        """Writer: copy queued sends into the ring as far as it has room; True if anything moved."""
        moved, finished = False, []
        while self.queue:
            op = self.queue[0]
            free = self.capacity - (self.pos - int(self.ctl[8]))
            if op.done_bytes < 0:  # header first
                if free < _MSG_HEADER:
                    break
                hdr = torch.tensor([op.key, op.tag, op.nbytes] + [0] * 5, dtype=torch.int64).view(torch.uint8)
                self._copy(hdr, 0, _MSG_HEADER, True)
                self.pos += _MSG_HEADER
                free -= _MSG_HEADER
                op.done_bytes = 0
            k = min(op.nbytes - op.done_bytes, free)
            if k > 0:
                self._copy(op.view, op.done_bytes, k, True)
                self.pos += k
                op.done_bytes += k
                free -= k
            pad = -self.pos % _MSG_HEADER
            if op.done_bytes < op.nbytes or free < pad:
                break
            self.pos += pad
            finished.append(self.queue.popleft())
        if self.pos != int(self.ctl[0]):
            self.ctl[0] = self.pos  # publish after the copies (x86: stores are seen in order)
            moved = True
        for op in finished:  # done only once the peer can see it
            op.done = True
        return moved

    def read(self, deliver) -> bool:
        """Reader: copy arrived bytes out; deliver(key, tag, nbytes) -> (uint8 view, done callback), or
        None to leave the message in the ring for now. True if anything moved."""
        moved = False
        while True:
            avail = int(self.ctl[0]) - self.pos
            if self.current is None:
                if avail < _MSG_HEADER:
                    break
                hdr = torch.empty(_MSG_HEADER, dtype=torch.uint8)
                self._copy(hdr, 0, _MSG_HEADER, False)
                key, tag, nbytes = hdr.view(torch.int64)[:3].tolist()
                where = deliver(key, tag, nbytes)
                if where is None:
                    break
                self.pos += _MSG_HEADER
                avail -= _MSG_HEADER
                self.current, self.got = (*where, nbytes), 0
                moved = True
            view, on_done, nbytes = self.current
            k = min(nbytes - self.got, avail)
            if k > 0:
                self._copy(view, self.got, k, False)
                self.pos += k
                self.got += k
                avail -= k
                moved = True
            pad = -self.pos % _MSG_HEADER
            if self.got < nbytes or avail < pad:
                break
            self.pos += pad
            self.current = None
            moved = True
            on_done()
        if moved:
            self.ctl[8] = self.pos
        return moved


class _Op:
    """A shared-memory send or receive: `view` is the tensor's bytes (uint8, flat)."""

    def __init__(self, tensor: torch.Tensor, peer: int, key: int, tag: int):
        self.peer, self.key, self.tag = peer, key, tag
        self.view = tensor.reshape(-1).view(torch.uint8)  # shares the tensor's storage
        self.nbytes = self.view.numel()
        self.done_bytes = -1  # sends: header not written yet
        self.done = False


class _Shm:
    """The process's shared-memory links: rings per same-host peer (global ranks), the matching of
    arrived messages to posted receives per (peer, group key, tag), and a helper thread that keeps
    messages moving while the rank is busy elsewhere (a blocking collective, a long compute): every
    5 ms while something is pending, asleep otherwise; `wait` moves them at once. State is guarded
    by one lock. Any error here is fatal to the job (the exchange that saw it is left half done)."""

    POLL_S = 5e-3

    def __init__(self):
        self.out: dict[int, _Ring] = {}  # peer -> ring we write
        self.inp: dict[int, _Ring] = {}  # peer -> ring we read
        self.pids: dict[int, int] = {}
        self.groups: dict = {}  # group -> (key, group ranks reached over shm, whole group reached)
        self.posted: dict[tuple, deque] = {}  # (peer, key, tag) -> receives waiting for a message
        self.parked: dict[tuple, deque] = {}  # (peer, key, tag) -> [buffer, done, receive] arrived first
        self.active: set[int] = set()  # peers with queued sends
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.error: BaseException | None = None

    def setup(self, group) -> tuple[int, set, bool]:
        """Once per group, collective over its members when it is a gloo group (no collective for
        other backends, which are the same on every member): find the members on this host, build
        the rings still missing, and agree on the pairs that use them (both ends must have mapped
        both rings). Returns (group key, group ranks reached, whether every pair of the group is)."""
        gk = group if group is not None else dist.group.WORLD
        if gk in self.groups:
            return self.groups[gk]
        if dist.get_backend(group) != "gloo":
            self.groups[gk] = (0, set(), False)
            return self.groups[gk]
        ranks, me = group_ranks(group), dist.get_rank()
        n, i_me = len(ranks), ranks.index(me)
        on = _shm_enabled()
        info = _gather(torch.tensor([_host_key() if on else -1, os.getpid(), secrets.randbits(62)]), group)
        hosts, pids, token = [int(t[0]) for t in info], [int(t[1]) for t in info], int(info[0][2])
        local = [i for i in range(n) if on and i != i_me and hosts[i] == hosts[i_me]]

        def kept(i):  # rings built by an earlier group's setup, with the same process
            r = ranks[i]
            return r in self.out and r in self.inp and self.pids.get(r) == pids[i]

        def path(src, dst):
            return f"/dev/shm/dist-{token:x}-{src}-{dst}"

        new = [i for i in local if not kept(i)]
        created, rings_out, rings_in = [], {}, {}
        reach = torch.zeros(n, dtype=torch.int64)
        try:
            ok = 1
            try:
                cap = _shm_capacity(len(local) * (len(local) + 1)) if new else 0
                for i in new:
                    created.append(path(me, ranks[i]))
                    rings_out[i] = _Ring(created[-1], cap)
            except (OSError, RuntimeError) as e:
                log.warning("shared-memory transport off for rank %d's new peers (%s); they use gloo", me, e)
                ok, rings_out = 0, {}
            oks = _gather(torch.tensor([ok]), group)
            for i in new:
                if ok and int(oks[i][0]):
                    try:
                        rings_in[i] = _Ring(path(ranks[i], me), None)
                    except (OSError, RuntimeError) as e:
                        log.warning("shared-memory transport: rank %d cannot map rank %d's ring (%s)", me, ranks[i], e)
            for i in local:
                reach[i] = int(kept(i) or (i in rings_out and i in rings_in))
            reaches = _gather(reach, group)  # the reach matrix, the same on every member
        finally:  # both ends have mapped both rings by now (or never will): nothing stays in /dev/shm,
            # also when the peer died in between (its ring to us is ours to remove: only we open it)
            for f in created + [path(ranks[i], me) for i in new]:
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass
        mutual = {(a, b) for a in range(n) for b in range(n) if a != b
                  and int(reaches[a][b]) and int(reaches[b][a])}
        pairs = {i for i in local if (i_me, i) in mutual}
        with self.lock:  # the helper thread walks these dicts
            for i in new:
                if i in pairs:
                    r = ranks[i]
                    self.out[r], self.inp[r], self.pids[r] = rings_out[i], rings_in[i], pids[i]
        whole = n > 1 and len(mutual) == n * (n - 1)
        self.groups[gk] = (token, pairs, whole)
        if pairs:
            log.debug("shared-memory transport: rank %d reaches group ranks %s", me, sorted(pairs))
        return self.groups[gk]

    def post(self, sends: list[_Op], recvs: list[_Op]) -> None:
        """Post an exchange's receives, then its sends, and copy in what fits now."""
        self._raise_error()
        with self.lock:
            for op in recvs:
                self._post_recv(op)
            for op in sends:
                self.out[op.peer].queue.append(op)
                self.active.add(op.peer)
            self.progress()
        self.wake.set()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="dist-shm-progress", daemon=True)
            self.thread.start()
            atexit.register(self._stop)  # before the interpreter kills daemon threads mid-copy

    def _stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=2.0)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"shared-memory transport failed: {self.error}") from self.error

    def _post_recv(self, op: _Op) -> None:
        key = (op.peer, op.key, op.tag)
        parked = self.parked.get(key)
        if parked:
            entry = parked.popleft()
            self._check_size(op, entry[0].numel())
            if entry[1]:
                op.view.copy_(entry[0])
                op.done = True
            else:
                entry[2] = op
            return
        self.posted.setdefault(key, deque()).append(op)

    @staticmethod
    def _check_size(op: _Op, nbytes: int) -> None:
        if nbytes != op.nbytes:
            raise RuntimeError(f"shared-memory transport: a message of {nbytes} bytes from rank {op.peer} "
                               f"(tag {op.tag}) met a receive buffer of {op.nbytes} bytes")

    def _deliver(self, peer: int):
        """Where the next message from `peer` goes: its posted receive; else, if a receive from that
        peer is posted (so something behind it is wanted), a parked copy; else nowhere yet (it stays
        in the ring; like a gloo send, it waits for a receive, and the parking keeps streams of
        other tags or groups from blocking each other)."""
        def deliver(key, tag, nbytes):
            waiting = self.posted.get((peer, key, tag))
            if waiting:
                op = waiting.popleft()
                self._check_size(op, nbytes)
                return op.view, lambda: setattr(op, "done", True)
            if not any(q for (p, _, _), q in self.posted.items() if p == peer):
                return None
            entry = [torch.empty(nbytes, dtype=torch.uint8), False, None]
            self.parked.setdefault((peer, key, tag), deque()).append(entry)

            def done():
                entry[1] = True
                if entry[2] is not None:
                    entry[2].view.copy_(entry[0])
                    entry[2].done = True
            return entry[0], done
        return deliver

    def progress(self) -> bool:
        """Move what can move (caller holds the lock); True if anything did."""
        moved = False
        for peer in list(self.active):
            moved |= self.out[peer].write()
            if not self.out[peer].queue:
                self.active.discard(peer)
        for peer, ring in self.inp.items():
            moved |= ring.read(self._deliver(peer))
        return moved

    def _pending(self) -> bool:
        return bool(self.active) or any(self.posted.values()) or any(r.current for r in self.inp.values())

    def _run(self) -> None:
        """Helper thread: keep pending messages moving while the rank does something else."""
        try:
            while not self.stopping:
                with self.lock:
                    pending = self._pending()
                    if not pending:
                        self.wake.clear()
                if not pending:
                    self.wake.wait()
                    continue
                time.sleep(self.POLL_S)
                with self.lock:
                    if not self.stopping:
                        self.progress()
        except BaseException as e:  # noqa: BLE001 - raised by the next post or wait
            self.error = e

    def _peer_gone(self, peer: int) -> bool:
        """The peer process has exited (gone, or a zombie not yet reaped)."""
        try:
            with open(f"/proc/{self.pids[peer]}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return True
        except OSError:
            return False

    def wait(self, ops: list[_Op], limit: datetime.timedelta | None) -> None:
        """Move messages until `ops` are done; RuntimeError on timeout or a dead peer."""
        t0 = last_check = time.monotonic()
        seconds = limit.total_seconds() if limit is not None else 1800.0
        while True:
            self._raise_error()
            with self.lock:
                moved = self.progress()
            pending = [op for op in ops if not op.done]
            if not pending:
                return
            now = time.monotonic()
            if now - t0 > seconds:
                raise RuntimeError(f"timed out after {seconds:.0f} s waiting for shared-memory messages with "
                                   f"rank(s) {sorted({op.peer for op in pending})} (DIST_COMM_TIMEOUT_S)")
            if now - last_check > 1.0:
                last_check = now
                for op in pending:
                    if self._peer_gone(op.peer):
                        raise RuntimeError(f"rank {op.peer} (pid {self.pids[op.peer]}) exited while this rank "
                                           "waited for its shared-memory messages")
            if not moved:  # spin briefly, then yield the core, then sleep a little
                waited = now - t0
                time.sleep(0 if waited < 2e-3 else min(1e-3, waited / 20))


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """all_gather of a small int64 tensor over `group` (setup only; no byte counting)."""
    t = t.to(torch.int64)
    out = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(out, t, group=group)
    return out


_SHM = _Shm()


class Exchange:
    """One step's point-to-point messages within `group`, posted together.

        ex = Exchange(group)
        ex.send(q_block, peer=prev, label="q")
        ex.recv(q_buffer, peer=next)
        ex.start()          # everything is in flight now
        ...compute...
        ex.wait()           # q_buffer is filled, q_block may be reused

    Peers are ranks within `group`. Each direction rides its own group (`direction_group`), so a
    send and a receive with the same peer proceed at once. Messages from one rank to another
    arrive in the order posted, per `tag` (use one tag per kind of message: a stream of KV blocks
    and a stream of gradient accumulators between the same two ranks must not be confused).
    Tensors must stay alive and unmodified until `wait()`. Zero-element tensors are skipped
    (nothing is sent). CPU tensors between ranks on one host go over shared memory (see `_Shm`),
    the rest over the group's backend. The first Exchange on a group creates its twin group and its
    shared-memory links, so every member must construct it (even one with nothing to send), like a
    collective.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = group_rank(group) if dist.is_initialized() else 0
        self._shm_key, self._shm_peers, self._shm_whole = 0, set(), False
        if dist.is_initialized() and group_size(group) > 1:
            twin_group(group)  # created on first use: every member constructs its first Exchange together
            self._shm_key, self._shm_peers, self._shm_whole = _SHM.setup(group)
        self._ops: dict = {}
        self._shm_sends: list[_Op] = []
        self._shm_recvs: list[_Op] = []
        self._works: list = []  # the backend's (gloo/NCCL) works in flight
        self._shm_posted: list[_Op] = []  # shared-memory sends and receives in flight

    def _add(self, op, tensor: torch.Tensor, src: int, dst: int, peer: int, tag: int) -> None:
        assert tensor.is_contiguous(), "point-to-point tensors must be contiguous"
        assert peer != self.rank, "no messages to self"
        if tensor.numel() == 0:
            return
        if peer in self._shm_peers and tensor.device.type == "cpu":
            shm_op = _Op(tensor, global_rank(self.group, peer), self._shm_key, tag)
            (self._shm_sends if op is dist.isend else self._shm_recvs).append(shm_op)
            return
        g = direction_group(self.group, src, dst)
        key = g if g is not None else dist.group.WORLD
        self._ops.setdefault(key, []).append(dist.P2POp(op, tensor, peer=global_rank(self.group, peer), group=key, tag=tag))

    def send(self, tensor: torch.Tensor, peer: int, label: str = "data", tag: int = 0) -> "Exchange":
        self._add(dist.isend, tensor, self.rank, peer, peer, tag)
        if tensor.numel():
            counters.add(label, tensor.numel() * tensor.element_size())
        return self

    def recv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> "Exchange":
        self._add(dist.irecv, tensor, peer, self.rank, peer, tag)
        return self

    def start(self) -> "Exchange":
        for ops in self._ops.values():
            works = dist.batch_isend_irecv(ops)
            self._works.extend(w for w in works if w is not None)
        self._ops = {}
        if self._shm_sends or self._shm_recvs:
            _SHM.post(self._shm_sends, self._shm_recvs)  # sends are copied into the rings now, as far as they fit
            self._shm_posted += self._shm_sends + self._shm_recvs
            self._shm_sends, self._shm_recvs = [], []
        return self

    def wait(self) -> None:
        limit = timeout()
        works, self._works = self._works, []
        shm_ops, self._shm_posted = self._shm_posted, []
        with _blocked():
            if shm_ops:  # first: a rank blocked in the backend then has no shared-memory send unfinished
                _SHM.wait(shm_ops, limit or _group_timeout(self.group))
            for work in works:
                if limit is None:
                    work.wait()
                else:
                    work.wait(limit)


def shm_peers(group=None) -> list[int]:
    """Ranks of `group` (group order) that this rank reaches over shared memory. Every member must
    call it the first time for a group, as for its first Exchange (it is one)."""
    return sorted(Exchange(group)._shm_peers)


_COLLECTIVE_TAG = 1 << 40  # shared-memory collectives' messages, apart from every user tag


def _over_shm(tensor: torch.Tensor, group) -> Exchange | None:
    """An Exchange for a collective when every pair of members talks over shared memory (the same
    answer on every member), else None."""
    if tensor.device.type != "cpu" or group_size(group) == 1:
        return None
    ex = Exchange(group)
    return ex if ex._shm_whole else None


def _shm_collective(ex: Exchange, to: list[torch.Tensor], into: list[torch.Tensor]) -> None:
    """Every member sends to[i] to member i and receives member i's into into[i] (its own: a copy)."""
    me = ex.rank
    into[me].copy_(to[me])
    for i in range(len(to)):
        if i != me:
            ex._add(dist.isend, to[i], me, i, i, _COLLECTIVE_TAG)
            ex._add(dist.irecv, into[i], i, me, i, _COLLECTIVE_TAG)
    ex.start().wait()


def all_gather(tensor: torch.Tensor, group=None, label: str = "data") -> list[torch.Tensor]:
    """All-gather equal-shaped tensors; returns one tensor per rank in group order.

    Counts (world - 1) * nbytes as sent: what this rank's data must reach the others. Over shared
    memory when the whole group is on one host.
    """
    world = group_size(group)
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(world)]
    ex = _over_shm(tensor, group)
    if ex is None:
        with _blocked():
            dist.all_gather(out, tensor, group=group)
    else:
        _shm_collective(ex, [tensor] * world, out)
    counters.add(label, (world - 1) * tensor.numel() * tensor.element_size())
    return out


def all_to_all(tensor: torch.Tensor, group=None, label: str = "data") -> torch.Tensor:
    """tensor: [world, ...]; slice i goes to rank i. Returns [world, ...] with slice j from rank j.

    Counts the (world - 1) slices that leave this rank as sent. Over shared memory when the whole
    group is on one host.
    """
    world = group_size(group)
    assert tensor.shape[0] == world
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    ex = _over_shm(tensor, group)
    if ex is None:
        with _blocked():
            dist.all_to_all_single(out, tensor, group=group)
    else:
        _shm_collective(ex, list(tensor), list(out))
    counters.add(label, (world - 1) * tensor[0].numel() * tensor.element_size())
    return out


def pack_rows(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pack tensors [batch, rows, ...] into as few contiguous messages as dtypes: one [batch, rows, width]
    tensor per distinct dtype, in order of first appearance. `row_spec` describes them for unpacking."""
    b, rows = tensors[0].shape[:2]
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.reshape(b, rows, -1))
    return [torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous() for parts in groups.values()]


def row_spec(tensors: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(trailing shape after [batch, rows], dtype) of each tensor: what `unpack_rows` needs."""
    return [(tuple(t.shape[2:]), t.dtype) for t in tensors]


def unpack_rows(packed: list[torch.Tensor], spec) -> list[torch.Tensor]:
    """Inverse of `pack_rows` (views into the messages)."""
    b, rows = packed[0].shape[:2]
    by_dtype = {p.dtype: p for p in packed}
    offsets = {dt: 0 for dt in by_dtype}
    out = []
    for shape, dtype in spec:
        width = int(torch.Size(shape).numel())
        start = offsets[dtype]
        out.append(by_dtype[dtype][:, :, start:start + width].reshape(b, rows, *shape))
        offsets[dtype] = start + width
    return out
