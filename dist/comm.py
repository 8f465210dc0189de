"""THE communication helper: point-to-point exchanges, the twin group, collectives with byte counts.

Everything in `dist` that moves tensors between ranks outside of plain DDP goes through here, so
that one place knows:

- how a step's messages are posted at once (`Exchange`: batched isend/irecv, started before the
  step's compute and waited after it, so the transfer overlaps the compute);
- how both directions of a link are kept busy on gloo: each direction of a bidirectional exchange
  rides its own process group (a group and its twin, `new_group_pair`; gloo serialises a send and a
  receive with the same peer on one group, see NOTES); NCCL needs no twin;
- how many bytes each rank sent, per label (`counters`), so tests can assert communication volume.

A dead peer raises when the process group's timeout (runtime.timeout_s) expires, never hangs.
Peers are given as ranks *within* `group` (group order); `None` means the default group.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
import torch.distributed as dist

_TWINS: dict = {}


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


def new_group_pair(ranks: list[int], timeout=None):
    """A process group of `ranks` and its twin: (group, twin) for members, (None, None) for others.

    Every rank of the world calls it at the same point of the program, as `dist.new_group` needs.
    On gloo the twin carries the opposite direction of every bidirectional exchange
    (`direction_group`); on other backends the group is its own twin.
    """
    group = dist.new_group(ranks, timeout=timeout)
    twin = group
    if dist.get_backend() == "gloo" and len(ranks) > 1:
        twin = dist.new_group(ranks, timeout=timeout)
    if dist.get_rank() not in ranks:
        return None, None
    _TWINS[group] = twin
    return group, twin


def twin_group(group=None):
    """The group that carries the downward direction of `group`'s exchanges: the twin made with it by
    `new_group_pair`; for the default group a twin made on first use (every rank is a member, so
    every rank gets there together, as with any collective); any other group is its own twin
    (correct, only slower on gloo)."""
    key = group if group is not None else dist.group.WORLD
    twin = _TWINS.get(key)
    if twin is None:
        twin = key
        if key is dist.group.WORLD and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            twin = dist.new_group(list(range(dist.get_world_size())))
        _TWINS[key] = twin
    return twin


def direction_group(group, src: int, dst: int):
    """The group that carries messages from group rank src to dst: `group` upwards, its twin downwards.

    So each direction of every link has its own group (and gloo connection), and messages between
    one ordered pair of ranks always ride the same group, in order.
    """
    return group if src < dst else twin_group(group)


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
    (nothing is sent).
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = group_rank(group) if dist.is_initialized() else 0
        self._ops: dict = {}
        self._works: list = []  # the backend's works in flight

    def _add(self, op, tensor: torch.Tensor, src: int, dst: int, peer: int, tag: int) -> None:
        assert tensor.is_contiguous(), "point-to-point tensors must be contiguous"
        assert peer != self.rank, "no messages to self"
        if tensor.numel() == 0:
            return
        g = direction_group(self.group, src, dst)
        key = g if g is not None else dist.group.WORLD
        self._ops.setdefault(key, []).append(
            dist.P2POp(op, tensor, peer=global_rank(self.group, peer), group=key, tag=tag))

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
        return self

    def wait(self) -> None:
        works, self._works = self._works, []
        with _blocked():
            for work in works:
                work.wait()


def all_gather(tensor: torch.Tensor, group=None, label: str = "data") -> list[torch.Tensor]:
    """All-gather equal-shaped tensors; returns one tensor per rank in group order.

    Counts (world - 1) * nbytes as sent: what this rank's data must reach the others.
    """
    world = group_size(group)
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(world)]
    with _blocked():
        dist.all_gather(out, tensor, group=group)
    counters.add(label, (world - 1) * tensor.numel() * tensor.element_size())
    return out


def all_to_all(tensor: torch.Tensor, group=None, label: str = "data") -> torch.Tensor:
    """tensor: [world, ...]; slice i goes to rank i. Returns [world, ...] with slice j from rank j.

    Counts the (world - 1) slices that leave this rank as sent.
    """
    world = group_size(group)
    assert tensor.shape[0] == world
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    with _blocked():
        dist.all_to_all_single(out, tensor, group=group)
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
