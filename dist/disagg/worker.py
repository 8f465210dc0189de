"""The worker loop: schedule -> execute -> update, one step at a time, as in vLLM v1.

A worker prefills (runs prompts and samples their first token), decodes (adds one token to every
request of its running batch per step), or both (colocated: each step prefills up to
serve.chunk_tokens prompt tokens beside the decodes, Sarathi-style chunked prefill). Requests join the
running batch when their KV lands and leave it the step they finish: continuous batching.

A prompt whose decode rank is another worker streams its KV to that worker layer by layer while it
runs (the pair's KVSender); its pages are freed when the transfer is DONE. Everything the worker
learns (new requests, aborts, KV that arrived) comes through one inbox, so the loop is the only
writer of its state. What it tells the router (one Report per step with events) leaves through an
outbox on its own thread: a step never waits for the router to take the previous report.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .channel import Abort, Event, PeerGone, Report, Request, Stop
from .runner import Runner
from .sampling import Sequence, sample, sample_batch
from .transfer import KVPoll, KVSender, KVTransfer

log = logging.getLogger("dist.disagg")


@dataclass
class Batch:
    """What one step runs: prompt chunks (sequence, tokens this step) and the decoding sequences."""
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    def __bool__(self):
        return bool(self.prefill or self.decode)


class Worker:
    def __init__(self, rank: int, *, prefills: bool, decodes: bool, runner: Runner, tokenizer, ctrl,
                 senders: dict[int, KVSender], max_batch: int, chunk_tokens: int):
        self.rank, self.prefills, self.decodes = rank, prefills, decodes
        self.runner, self.cache, self.tokenizer = runner, runner.cache, tokenizer
        self.ctrl, self.senders = ctrl, senders
        self.receivers: list = []                   # KVReceivers feeding this worker (joined at the end)
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens if decodes else 1 << 62  # a prefill-only worker runs whole prompts
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()    # Reports for the router (sent by _send_reports)
        self.waiting: deque[Sequence] = deque()     # to prefill (head may be part-way through its prompt)
        self.running: list[Sequence] = []           # decoding
        self.sending: list[KVTransfer] = []         # prefilled, KV on its way to the decode worker
        self.transfers: dict[int, KVTransfer] = {}  # prompts whose KV streams out while they run
        self.aborted: set[int] = set()
        self.events: list[Event] = []
        self.stopping = False

    # -- inputs --------------------------------------------------------------------------------------------------

    def deliver(self, seq: Sequence) -> None:
        """KVReceiver callback (its thread): a sequence whose KV now sits in our pages."""
        self.inbox.put(("kv", seq))

    def _read_ctrl(self) -> None:
        try:
            while True:
                msg = self.ctrl.recv()
                if msg is not None:
                    self.inbox.put(msg)
                if isinstance(msg, Stop):
                    return
        except PeerGone as e:
            self.inbox.put(("gone", str(e)))

    def _send_reports(self) -> None:
        """The loop's reports to the router, from this thread: a point-to-point send completes only once the
        router's receiver took it, and the decode step must not wait on the router's process being scheduled.
        Reports that queued up meanwhile go as one (all their events, the latest counts)."""
        while True:
            reports = [self.outbox.get()]
            while not self.outbox.empty():
                reports.append(self.outbox.get_nowait())
            last = reports[-1]
            try:
                self.ctrl.send(Report(last.rank, [ev for r in reports for ev in r.events], last.waiting,
                                      last.running, last.blocks_used, last.stopped))
            except PeerGone as e:
                self.inbox.put(("gone", str(e)))
                return
            if last.stopped:
                return

    def _drain(self, timeout: float) -> None:
        try:
            item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        if isinstance(item, Request):
            self.waiting.append(Sequence(item.rid, item.prompt, item.params, item.decode_rank))
        elif isinstance(item, Abort):
            self.aborted.add(item.rid)
            for seq in [s for s in (*self.waiting, *self.running) if s.rid == item.rid]:
                self._release(seq)
            self.waiting = deque(s for s in self.waiting if s.rid != item.rid)
            self.running = [s for s in self.running if s.rid != item.rid]
        elif isinstance(item, Stop):
            self.stopping = True
        elif item[0] == "kv":
            seq = item[1]
            if seq.rid in self.aborted:
                self.cache.manager.free(seq.blocks)
            else:
                self.running.append(seq)
        elif item[0] == "gone":
            raise RuntimeError(f"rank {self.rank}: lost the router: {item[1]}")

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> None:
        threading.Thread(target=self._read_ctrl, name="ctrl-recv", daemon=True).start()
        reporter = threading.Thread(target=self._send_reports, name="ctrl-send", daemon=True)
        reporter.start()
        last_report, batch = 0.0, Batch()
        while True:
            # after a step that ran, look at the inbox without waiting; with work that cannot run yet (pages
            # in use, a KV transfer in flight) poll every 2 ms; idle, wait for the inbox
            busy = self.waiting or self.running or self.sending
            self._drain(timeout=0 if batch else 0.002 if busy else 0.5)
            if self.stopping and not (self.waiting or self.running or self.sending):
                break
            batch = self.schedule()
            if batch:
                self.update(batch, self.execute(batch))
            self.poll_transfers()
            if self.events or time.monotonic() - last_report > 0.5:
                self.report()
                last_report = time.monotonic()
        self.runner.close()
        for sender in self.senders.values():
            sender.close()
        for receiver in self.receivers:
            receiver.thread.join(timeout=10)  # until its prefill worker closed the link
        self.report(stopped=True)
        reporter.join(timeout=30)

    def schedule(self) -> Batch:
        batch = Batch()
        bs = self.cache.layout.block_size
        for seq in self.running[:self.max_batch]:
            if seq.n_cached == len(seq.blocks) * bs:  # the new token needs a fresh page
                page = self.cache.manager.allocate(1)
                if page is None:
                    continue  # back-pressure: this sequence waits a step
                seq.blocks += page
            batch.decode.append(seq)
        budget = self.chunk_tokens
        for seq in self.waiting:
            if budget <= 0 or len(self.running) + len(batch.prefill) >= self.max_batch:
                break
            if not seq.blocks:
                # the prompt's pages, plus room for the first decode step when this worker decodes it
                need = self.cache.layout.blocks_for(len(seq.prompt) + (seq.decode_rank == self.rank))
                pages = self.cache.manager.allocate(need)
                if pages is None:
                    break  # back-pressure: the prompt waits for pages
                seq.blocks = pages
            n = min(budget, len(seq.prompt) - seq.n_cached)
            batch.prefill.append((seq, n))
            budget -= n
            if not self.decodes:
                break  # one whole prompt per step: its first token goes out at once
        return batch

    def execute(self, batch: Batch) -> tuple[list, object]:
        """Run the model: last-position logits of each prompt chunk, and [batch, vocab] for the decodes.
        A whole prompt whose decode worker is another rank streams its KV there layer by layer as it runs."""
        prefill = []
        for seq, n in batch.prefill:
            start, on_layer = seq.n_cached, None
            if seq.decode_rank != self.rank and start == 0 and n == len(seq.prompt):
                t = self.transfers[seq.rid] = self.senders[seq.decode_rank].start(seq, n)
                pages = seq.blocks[:self.cache.layout.blocks_for(n)]
                on_layer = lambda i, t=t, pages=pages: t.add_layer(self.cache.pack_layer(i, pages))  # noqa: E731
            prefill.append(self.runner.prefill(seq.prompt[start:start + n], start, seq.blocks, on_layer))
            seq.n_cached += n
        decode = None
        if batch.decode:
            decode = self.runner.decode([s.output[-1] for s in batch.decode], [s.n_cached for s in batch.decode],
                                        [s.blocks for s in batch.decode])
            for s in batch.decode:
                s.n_cached += 1
        return prefill, decode

    def update(self, batch: Batch, out) -> None:
        prefill_logits, decode_logits = out
        for (seq, _), logits in zip(batch.prefill, prefill_logits):
            if seq.n_cached < len(seq.prompt):
                continue  # more chunks to go
            self.waiting.remove(seq)
            transfer = self.transfers.pop(seq.rid, None)
            finished = self._advance(seq, sample(logits, seq.params, len(seq.output)), release=transfer is None)
            if transfer is not None:  # pages stay until the decode worker has them (or dropped them)
                transfer.finish(None if finished else seq)
                self.sending.append(transfer)
            elif not finished:
                self.running.append(seq)
        finished = set()
        if batch.decode:
            seqs = batch.decode
            tokens = sample_batch(decode_logits, [s.params for s in seqs], [len(s.output) for s in seqs])
            for seq, token in zip(seqs, tokens):
                if self._advance(seq, token):
                    finished.add(seq.rid)
        if finished:
            self.running = [s for s in self.running if s.rid not in finished]

    def _advance(self, seq: Sequence, token: int, release: bool = True) -> bool:
        """Append the sampled token, queue its event; True when the request is finished (pages freed if `release`)."""
        delta, finish = seq.append(token, self.tokenizer)
        self.events.append(Event(seq.rid, delta, len(seq.output), finish))
        if finish and release:
            self._release(seq)
        return finish is not None

    def poll_transfers(self) -> None:
        still = []
        for t in self.sending:
            if t.state is KVPoll.DONE:
                self._release(t.seq)
                self.events.append(Event(t.seq.rid, tokens=len(t.seq.output), kv_bytes=t.nbytes, kv_s=t.seconds))
            elif t.state is KVPoll.FAILED:
                self._release(t.seq)
                if t.seq.rid not in self.aborted:
                    self.events.append(Event(t.seq.rid, finish="error", error=f"KV transfer failed: {t.error}"))
            else:
                still.append(t)
        self.sending = still

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.cache.manager.free(seq.blocks)
            seq.blocks = []

    def report(self, stopped: bool = False) -> None:
        self.runner.heartbeat()  # keeps a prefill group's followers inside their collective timeout
        self.outbox.put(Report(self.rank, self.events, len(self.waiting), len(self.running),
                               self.cache.manager.num_used, stopped))
        self.events = []
