"""KV transfer from a prefill worker to a decode worker, over any Channel (dist or local).

    handshake_send(ch, layout) / handshake_recv(ch, layout)   # at start: both raise on a layout mismatch
    sender = KVSender(ch, cache, generation)                    # prefill side, one background thread
    t = sender.send(seq)                                        # t.state: KVPoll; DONE -> free seq.blocks
    receiver = KVReceiver(ch, cache, generation, deliver)       # decode side, one background thread

Per request: the prefill side sends a header (request id, generation, token count, page count, checksum),
the Sequence (prompt, output so far, sampling parameters) and the packed pages of every layer; the
decode side allocates its pages, receives, checks generation and checksum, writes the pages, acknowledges
and hands the Sequence (now holding its own pages) to `deliver(seq, transfer)`. KV from another
generation of workers (a restart) or with a wrong checksum is dropped and answered FAILED: stale KV is
never used. An idle sender sends a heartbeat header every `heartbeat_s`, so a silent receiver means a
dead or stuck peer.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, replace

import torch

from .channel import PeerGone
from .kvcache import KVLayout, PagedKVCache
from .sampling import Sequence

log = logging.getLogger("dist.disagg")

HEARTBEAT, CLOSE = -1, -2  # header request ids that carry no KV


class KVPoll(enum.Enum):
    WAITING = "waiting"            # queued behind other transfers
    TRANSFERRING = "transferring"
    DONE = "done"                  # the decode worker holds the KV: free the prefill pages
    FAILED = "failed"


@dataclass
class KVTransfer:
    seq: Sequence
    state: KVPoll = KVPoll.WAITING
    error: str = ""
    nbytes: int = 0
    seconds: float = 0.0


def checksum(packed: torch.Tensor) -> int:
    """CRC32 of the packed pages' bytes (on GPU this copies them to the host)."""
    data = packed.detach().contiguous().cpu().view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data))


def handshake_send(ch, layout: KVLayout) -> None:
    """Prefill side: send our layout, raise ValueError if the decode side refused it."""
    ch.send(layout)
    verdict = ch.recv()
    if verdict != "ok":
        raise ValueError(verdict)


def handshake_recv(ch, layout: KVLayout) -> None:
    """Decode side: compare the prefill side's layout with ours; both sides raise on a mismatch."""
    theirs = ch.recv()
    try:
        layout.check(theirs, f"rank {ch.peer}")
    except ValueError as e:
        ch.send(str(e))
        raise
    ch.send("ok")


class KVSender:
    def __init__(self, ch, cache: PagedKVCache, generation: int, heartbeat_s: float = 1.0):
        self.ch, self.cache, self.generation, self.heartbeat_s = ch, cache, generation, heartbeat_s
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"kv-send-{ch.peer}", daemon=True)
        self.thread.start()

    def send(self, seq: Sequence) -> KVTransfer:
        t = KVTransfer(seq)
        self.queue.put(t)
        return t

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            try:
                t = self.queue.get(timeout=self.heartbeat_s)
            except queue.Empty:
                t = HEARTBEAT
            try:
                if t is None:
                    self.ch.send_tensor(torch.tensor([CLOSE, 0, 0, 0, 0]))
                    return
                if t is HEARTBEAT:
                    self.ch.send_tensor(torch.tensor([HEARTBEAT, 0, 0, 0, 0]))
                    continue
                self._send_one(t)
            except PeerGone as e:
                log.error("KV transfer to rank %s failed: %s", self.ch.peer, e)
                if isinstance(t, KVTransfer):
                    t.state, t.error = KVPoll.FAILED, f"decode worker unreachable: {e}"
                self._fail_rest(str(e))
                return

    def _send_one(self, t: KVTransfer) -> None:
        t.state, start = KVPoll.TRANSFERRING, time.perf_counter()
        seq = t.seq
        n_blocks = self.cache.layout.blocks_for(seq.n_cached)
        packed = self.cache.pack(seq.blocks[:n_blocks])
        header = torch.tensor([seq.rid, self.generation, seq.n_cached, n_blocks, checksum(packed)])
        self.ch.send_tensor(header)
        self.ch.send(replace(seq, blocks=[]))
        self.ch.send_tensor(packed)
        ok = self.ch.recv()  # "ok" or the receiver's reason
        t.nbytes, t.seconds = packed.numel() * packed.element_size(), time.perf_counter() - start
        if ok == "ok":
            t.state = KVPoll.DONE
        else:
            t.state, t.error = KVPoll.FAILED, ok

    def _fail_rest(self, why: str) -> None:
        while True:
            try:
                t = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(t, KVTransfer):
                t.state, t.error = KVPoll.FAILED, f"decode worker unreachable: {why}"


class KVReceiver:
    """Decode side: one thread receiving from one prefill worker; deliver(seq, transfer) for each good one."""

    def __init__(self, ch, cache: PagedKVCache, generation: int, deliver, on_gone=None):
        self.ch, self.cache, self.generation, self.deliver = ch, cache, generation, deliver
        self.on_gone = on_gone
        self.thread = threading.Thread(target=self._loop, name=f"kv-recv-{ch.peer}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while self._recv_one():
                pass
        except PeerGone as e:
            log.error("KV receiver from rank %s stopped: %s", self.ch.peer, e)
            if self.on_gone:
                self.on_gone(self.ch.peer, str(e))

    def _recv_one(self) -> bool:
        rid, generation, n_tokens, n_blocks, crc = self.ch.recv_tensor((5,), torch.int64).tolist()
        if rid == CLOSE:
            return False
        if rid == HEARTBEAT:
            return True
        start = time.perf_counter()
        seq: Sequence = self.ch.recv()
        lay = self.cache.layout
        shape = (lay.n_layers, 2, n_blocks, lay.block_size, lay.n_kv_heads, lay.head_dim)
        blocks = self.cache.manager.allocate(n_blocks)  # pre-allocated before the pages arrive
        packed = self.ch.recv_tensor(shape, lay.torch_dtype)
        problem = ""
        if generation != self.generation:
            problem = f"stale KV for request {rid}: generation {generation}, this worker is {self.generation}"
        elif checksum(packed) != crc:
            problem = f"KV of request {rid} arrived corrupted (checksum mismatch)"
        elif blocks is None:
            problem = f"no free KV pages for request {rid} ({n_blocks} needed, {self.cache.manager.num_free} free)"
        if problem:
            if blocks is not None:
                self.cache.manager.free(blocks)
            log.warning("%s: dropped", problem)
            self.ch.send(problem)
            return True
        self.cache.unpack(blocks, packed)
        self.ch.send("ok")
        seq.blocks, seq.n_cached = blocks, n_tokens
        nbytes = packed.numel() * packed.element_size()
        self.deliver(seq, KVTransfer(seq, KVPoll.DONE, nbytes=nbytes, seconds=time.perf_counter() - start))
        return True
