"""Messages between the router and the workers, and the channels that carry them and the KV pages.

A Channel joins this rank to one peer in one direction pair:

    ch.send(obj)                    # any picklable message (None is a heartbeat)
    obj = ch.recv()                 # blocks; raises PeerGone when the peer died or went silent
    ch.send_tensor(t); ch.recv_tensor(shape, dtype)

DistChannel runs over torch.distributed point-to-point (gloo on CPU, NCCL on GPU), one process group per
direction (gloo moves a direction at full rate only on its own group). LocalChannel joins two threads of
one process (rank 0 routing and prefilling, and the tests' fake transfer backend).

The router -> worker messages are Request, Abort and Stop; a worker answers with one Report per loop
step, holding the Events of every request it advanced.
"""

from __future__ import annotations

import pickle
import queue
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .sampling import SamplingParams


@dataclass
class Request:
    """Router -> prefill worker: run this prompt, then hand the sequence to `decode_rank`."""
    rid: int
    prompt: list[int]
    params: SamplingParams
    decode_rank: int


@dataclass
class Abort:
    """Router -> workers: forget request `rid` (client gone, deadline passed)."""
    rid: int


@dataclass
class Stop:
    """Router -> workers: finish what is running, then exit."""


@dataclass
class Event:
    """One request's progress in one worker step."""
    rid: int
    text: str = ""
    tokens: int = 0                 # tokens generated so far
    finish: str | None = None       # "stop" | "length" | "error"
    error: str = ""
    kv_bytes: int = 0               # KV moved for this request (prefill worker, once, when acknowledged)
    kv_s: float = 0.0               # seconds of the transfer the prefill did not hide


@dataclass
class Report:
    """Worker -> router, once per loop step (and as a heartbeat when idle)."""
    rank: int
    events: list[Event] = field(default_factory=list)
    waiting: int = 0                # requests queued for prefill on this worker
    running: int = 0                # requests in the decode batch
    blocks_used: int = 0
    stopped: bool = False           # the worker has left its loop (answer to Stop)


class PeerGone(RuntimeError):
    """The peer of a channel died, closed or went silent past the timeout."""


class DistChannel:
    """Messages and tensors to and from `peer` over two process groups (one per direction)."""

    def __init__(self, peer: int, send_group, recv_group, device="cpu"):
        self.peer, self.send_group, self.recv_group, self.device = peer, send_group, recv_group, device
        self.lock = threading.Lock()  # one message at a time (its length and payload are two sends)

    def send(self, obj) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        with self.lock:
            self.send_tensor(torch.tensor([data.numel()], dtype=torch.int64))
            self.send_tensor(data)

    def recv(self):
        n = self.recv_tensor((1,), torch.int64)
        return pickle.loads(self.recv_tensor((int(n),), torch.uint8).cpu().numpy().tobytes())

    def send_tensor(self, t: torch.Tensor) -> None:
        try:
            dist.send(t.contiguous().to(self.device), self.peer, group=self.send_group)  # headers: host tensors
        except RuntimeError as e:
            raise PeerGone(f"rank {self.peer}: {e}") from e

    def recv_tensor(self, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            dist.recv(t, self.peer, group=self.recv_group)
        except RuntimeError as e:
            raise PeerGone(f"rank {self.peer}: {e}") from e
        return t


class LocalChannel:
    """Both ends in one process: `a, b = LocalChannel.pair()`; what a sends, b receives, and back."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout_s: float = 300.0):
        self.inbox, self.outbox, self.timeout_s = inbox, outbox, timeout_s
        self.peer = "local"

    @classmethod
    def pair(cls, timeout_s: float = 300.0) -> tuple["LocalChannel", "LocalChannel"]:
        a, b = queue.Queue(), queue.Queue()
        return cls(a, b, timeout_s), cls(b, a, timeout_s)

    def send(self, obj) -> None:
        self.outbox.put(pickle.dumps(obj))  # a copy, as over the wire

    def recv(self):
        try:
            return pickle.loads(self.inbox.get(timeout=self.timeout_s))
        except queue.Empty:
            raise PeerGone(f"local peer silent for {self.timeout_s:.0f} s") from None

    def send_tensor(self, t: torch.Tensor) -> None:
        self.outbox.put(t.clone())

    def recv_tensor(self, shape, dtype) -> torch.Tensor:
        try:
            t = self.inbox.get(timeout=self.timeout_s)
        except queue.Empty:
            raise PeerGone(f"local peer silent for {self.timeout_s:.0f} s") from None
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, "local channel: tensor out of order"
        return t
