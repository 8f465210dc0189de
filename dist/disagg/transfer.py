"""KV transfer from a prefill worker to a decode worker, over any Channel (dist or local).

    handshake_send(ch, layout) / handshake_recv(ch, layout)   # at start: both raise on a layout mismatch
    sender = KVSender(ch, cache, generation)                    # prefill side, one background thread
    t = sender.start(seq, n_tokens)                             # before the prompt runs; then per layer
    t.add_layer(cache.pack_layer(layer, blocks)); t.finish(seq) # t.state: KVPoll; DONE -> free seq.blocks
    t = sender.send(seq)                                        # or all at once, after the prompt ran
    receiver = KVReceiver(ch, cache, generation, deliver)       # decode side: deliver(seq), its own thread

Per request: the prefill side sends a header (request id, generation, token count, page count) and the
Sequence (prompt, sampling parameters) before the prompt runs, then each layer's packed pages as soon as
the prompt's forward has written them (the transfer overlaps the prefill), then a trailer (checksum of
all pages, first token, characters already streamed); the decode side allocates its pages at the
header, writes each layer as it lands, checks generation and checksum (both sides compute it where the
pages are, on the GPU there), answers with a code and hands the Sequence (now holding its own pages) to
`deliver(seq)`. After the prompt's forward only the last layer, the trailer and the answer are left to
move. KV from another generation of workers (a restart) or with a wrong checksum is dropped and answered
FAILED: stale KV is never used. An idle sender sends a heartbeat header every `heartbeat_s`, so a
silent receiver means a dead or stuck peer. `KVTransfer.seconds` is the part the prefill did not hide:
from the end of the prompt's forward (finish) to the acknowledgement.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .channel import PeerGone
from .kvcache import KVLayout, PagedKVCache
from .sampling import Sequence

log = logging.getLogger("dist.disagg")

HEARTBEAT, CLOSE = -1, -2  # header request ids that carry no KV
REFUSALS = {1: "stale KV from another generation of workers", 2: "KV arrived corrupted (checksum mismatch)",
            3: "no free KV pages on the decode worker"}  # the decode side's answer codes (0: ok)


class KVPoll(enum.Enum):
    WAITING = "waiting"            # queued behind other transfers
    TRANSFERRING = "transferring"
    DONE = "done"                  # the decode worker holds the KV: free the prefill pages
    FAILED = "failed"


@dataclass(eq=False)
class KVTransfer:
    """One request's KV on its way; the prefill side feeds it layer by layer while the prompt runs."""

    seq: Sequence
    n_tokens: int = 0
    state: KVPoll = KVPoll.WAITING
    error: str = ""
    nbytes: int = 0
    seconds: float = 0.0          # from finish() to the acknowledgement
    finished_at: float = 0.0
    parts: queue.Queue = field(default_factory=queue.Queue)  # packed layers, then ("end", seq | None)

    def add_layer(self, packed: torch.Tensor) -> None:
        """One layer's pages, [2, n_blocks, block_size, heads_kv, head_dim] (a copy: the sender never reads pages)."""
        self.parts.put(packed)

    def finish(self, seq: Sequence | None) -> None:
        """After the last layer: the sequence to hand over (None: it already finished, the decode side drops it)."""
        self.finished_at = time.perf_counter()
        self.parts.put(("end", seq))


CHECK_MOD = (1 << 31) - 1  # a prime: the checksum's terms stay far inside int64
CHECK_WORDS = 1 << 24      # words widened to int64 at a time (128 MB), so a long prompt's layer is not copied whole


def checksum(packed: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """A 31-bit checksum of one layer's packed pages, continuing `acc` (the previous layers'), computed
    where the pages are: an int64 tensor on their device, so a GPU's KV never goes through the host (the
    trailer reads it once per request). Each token row's 16-bit words are weighted by their column and
    summed, the rows weighted by their position and the layers folded in order: a changed word, two words
    of a row swapped, or a lost, moved or stale row or layer changes it."""
    rows = packed.detach().contiguous().view(torch.int16).reshape(packed.shape[0] * packed.shape[1]
                                                                  * packed.shape[2], -1)
    n, width = rows.shape
    dev = rows.device
    cols = torch.arange(1, width + 1, dtype=torch.int64, device=dev)
    layer = torch.zeros((), dtype=torch.int64, device=dev)
    step = max(1, CHECK_WORDS // width)
    for start in range(0, n, step):
        sums = (rows[start:start + step].to(torch.int64) * cols).sum(dim=1) % CHECK_MOD
        weights = torch.arange(start + 1, start + len(sums) + 1, dtype=torch.int64, device=dev)
        layer = (layer + (sums * weights % CHECK_MOD).sum()) % CHECK_MOD
    return layer if acc is None else (acc * 1_000_003 + layer) % CHECK_MOD


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

    def start(self, seq: Sequence, n_tokens: int) -> KVTransfer:
        """A transfer of the first n_tokens positions of `seq`, to be fed with add_layer() and finish()."""
        t = KVTransfer(seq, n_tokens)
        self.queue.put(t)
        return t

    def send(self, seq: Sequence) -> KVTransfer:
        """All of `seq`'s cached KV at once (its prompt already ran)."""
        t = self.start(seq, seq.n_cached)
        blocks = seq.blocks[:self.cache.layout.blocks_for(seq.n_cached)]
        for layer in range(self.cache.layout.n_layers):
            t.add_layer(self.cache.pack_layer(layer, blocks))
        t.finish(seq)
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
        t.state = KVPoll.TRANSFERRING
        seq = t.seq
        n_blocks = self.cache.layout.blocks_for(t.n_tokens)
        self.ch.send_tensor(torch.tensor([seq.rid, self.generation, t.n_tokens, n_blocks, 0]))
        self.ch.send(Sequence(seq.rid, seq.prompt, seq.params, seq.decode_rank))  # what is known before the prompt runs
        crc = None
        for _ in range(self.cache.layout.n_layers):  # each layer as soon as the prompt's forward wrote it
            packed = t.parts.get()
            crc = checksum(packed, crc)
            self.ch.send_tensor(packed)
            t.nbytes += packed.numel() * packed.element_size()
        _, done = t.parts.get()
        if done is not None:
            assert len(done.output) == 1, "a prefilled sequence carries exactly its first token"
        # trailer: checksum, first token (-1: the request already finished), characters already streamed
        token, streamed = (-1, 0) if done is None else (done.output[0], done.sent)
        self.ch.send_tensor(torch.cat([crc.view(1), torch.tensor([token, streamed], device=crc.device)]))
        code = int(self.ch.recv_tensor((1,), torch.int64))
        t.seconds = time.perf_counter() - t.finished_at
        if code == 0:
            t.state = KVPoll.DONE
        else:
            t.state, t.error = KVPoll.FAILED, f"request {seq.rid}: {REFUSALS[code]}"

    def _fail_rest(self, why: str) -> None:
        while True:
            try:
                t = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(t, KVTransfer):
                t.state, t.error = KVPoll.FAILED, f"decode worker unreachable: {why}"


class KVReceiver:
    """Decode side: one thread receiving from one prefill worker; deliver(seq) for each good one."""

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
        rid, generation, n_tokens, n_blocks, _ = self.ch.recv_tensor((5,), torch.int64).tolist()
        if rid == CLOSE:
            return False
        if rid == HEARTBEAT:
            return True
        lay = self.cache.layout
        blocks = self.cache.manager.allocate(n_blocks)  # pre-allocated before the pages arrive
        seq: Sequence = self.ch.recv()
        crc = None
        for layer in range(lay.n_layers):
            packed = self.ch.recv_tensor((2, n_blocks, lay.block_size, lay.n_kv_heads, lay.head_dim),
                                         lay.torch_dtype)
            crc = checksum(packed, crc)
            if blocks is not None:
                self.cache.unpack_layer(layer, blocks, packed)
        sent_crc, token, streamed = self.ch.recv_tensor((3,), torch.int64).tolist()
        code = 1 if generation != self.generation else 2 if int(crc) != sent_crc else 3 if blocks is None else 0
        if code or token < 0:  # refused, or the request finished with its first token: the pages go back unused
            if blocks is not None:
                self.cache.manager.free(blocks)
            if code:
                log.warning("KV of request %d dropped: %s (generation %d here %d)", rid, REFUSALS[code], generation,
                            self.generation)
            self.ch.send_tensor(torch.tensor([code]))
            return True
        seq.output, seq.sent, seq.blocks, seq.n_cached = [token], streamed, blocks, n_tokens
        self.deliver(seq)  # the decode loop may take it up while the acknowledgement travels
        self.ch.send_tensor(torch.tensor([0]))
        return True
