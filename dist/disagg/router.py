"""The router (rank 0): admits requests, picks their prefill and decode workers, fans events back.

    router = Router(roles, channels, serve_cfg, metrics)
    router.start(loop)                                # receiver threads, heartbeats
    handle = router.submit(prompt_ids, params)        # events arrive on handle.events (an asyncio.Queue)
    router.abort(handle)                              # client gone or deadline passed

Admission: a request is dispatched only when its decode worker has pages reserved for the whole request
(prompt + max_tokens) and a free slot in its running batch, so KV always has somewhere to go and a
decode worker never runs out of pages mid-stream; otherwise it waits here (back-pressure, the
dist_serve_router_waiting gauge). A worker whose channel breaks is marked dead and every request it
held ends with an error event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .channel import Abort, Event, PeerGone, Report, Request, Stop
from .roles import Roles
from .sampling import SamplingParams

log = logging.getLogger("dist.disagg")


@dataclass(eq=False)
class Handle:
    rid: int
    prompt: list[int]
    params: SamplingParams
    need: int                      # pages reserved on the decode worker
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefill: int = -1
    decode: int = -1
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0
    done: bool = False
    early: list = field(default_factory=list)  # decode worker's events that overtook the prefill worker's first


class Router:
    def __init__(self, roles: Roles, channels: dict, serve_cfg, metrics, block_size: int):
        self.roles, self.channels, self.cfg, self.metrics = roles, channels, serve_cfg, metrics
        self.block_size = block_size
        self.rids = itertools.count(1)
        self.pending: deque[Handle] = deque()
        self.live: dict[int, Handle] = {}
        self.reserved = {d: 0 for d in roles.workers}
        self.running = {d: 0 for d in roles.workers}
        self.prefilling = {p: 0 for p in roles.workers}
        self.dead: dict[int, str] = {}
        self.stopped: set[int] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- start / stop --------------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for rank, ch in self.channels.items():
            threading.Thread(target=self._read, args=(rank, ch), name=f"router-recv-{rank}", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="router-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while len(self.stopped) < len(self.channels):
            for rank, ch in self.channels.items():
                if rank not in self.dead and rank not in self.stopped:
                    try:
                        ch.send(None)
                    except PeerGone as e:
                        self.loop.call_soon_threadsafe(self._on_gone, rank, str(e))
            time.sleep(1.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """After the HTTP server drained: tell every worker to stop and wait for their last reports."""
        for rank, ch in self.channels.items():
            if rank not in self.dead:
                try:
                    ch.send(Stop())
                except PeerGone:
                    pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(self.stopped | set(self.dead)) < len(self.channels):
            time.sleep(0.05)

    @property
    def healthy(self) -> bool:
        return not self.dead

    # -- requests ------------------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        need = -(-(len(prompt) + params.max_tokens) // self.block_size)
        h = Handle(next(self.rids), prompt, params, need)
        self.live[h.rid] = h
        self.pending.append(h)
        self._dispatch()
        return h

    def abort(self, h: Handle) -> None:
        if h.done:
            return
        if h in self.pending:
            self.pending.remove(h)
        else:
            for rank in {h.prefill, h.decode}:
                if rank in self.channels and rank not in self.dead:
                    try:
                        self.channels[rank].send(Abort(h.rid))
                    except PeerGone:
                        pass
        self._finish(h)

    def _dispatch(self) -> None:
        while self.pending and not self.dead:
            h = self.pending[0]
            fits = [d for d in self.roles.decode if self.reserved[d] + h.need <= self.cfg.num_blocks
                    and self.running[d] < self.cfg.max_batch]
            if not fits:
                break
            d = min(fits, key=lambda r: (self.running[r], self.reserved[r]))
            colocated = self.roles.mode == "colocated"
            p = d if colocated else min(self.roles.prefill_leaders, key=lambda r: self.prefilling[r])
            self.pending.popleft()
            h.prefill, h.decode = p, d
            self.reserved[d] += h.need
            self.running[d] += 1
            self.prefilling[p] += 1
            try:
                self.channels[p].send(Request(h.rid, h.prompt, h.params, d))
            except PeerGone as e:
                self._on_gone(p, str(e))  # ends this request (and the rest) with an error event
        self.metrics.router_waiting.set(len(self.pending))

    def _finish(self, h: Handle) -> None:
        """Release what the request held (once)."""
        if h.done:
            return
        h.done = True
        self.live.pop(h.rid, None)
        if h.decode >= 0:
            self.reserved[h.decode] -= h.need
            self.running[h.decode] -= 1
            if not h.t_first:
                self.prefilling[h.prefill] -= 1
        self._dispatch()

    # -- from the workers (receiver threads hand over to the event loop) ----------------------------------------

    def _read(self, rank: int, ch) -> None:
        try:
            while True:
                report = ch.recv()
                self.loop.call_soon_threadsafe(self._on_report, report)
                if report.stopped:
                    return
        except PeerGone as e:
            self.loop.call_soon_threadsafe(self._on_gone, rank, str(e))

    def _on_report(self, report: Report) -> None:
        m, rank = self.metrics, str(report.rank)
        m.worker_waiting.labels(rank).set(report.waiting)
        m.running_batch.labels(rank).set(report.running)
        m.kv_blocks_used.labels(rank).set(report.blocks_used)
        if report.stopped:
            self.stopped.add(report.rank)
        for ev in report.events:
            if ev.kv_bytes:  # a prefill worker's KV reached the decode worker: metrics only
                m.kv_bytes.inc(ev.kv_bytes)
                m.kv_transfer.observe(ev.kv_s)
                continue
            h = self.live.get(ev.rid)
            if h is None:
                continue  # aborted or finished meanwhile
            if report.rank != h.prefill and not h.t_first and ev.finish != "error":
                # the two workers report on separate links: the decode worker's second token can reach us
                # before the prefill worker's first; hold it until the first is here
                h.early.append(ev)
                continue
            self._deliver(h, ev)
            while h.early and h.t_first and not h.done:
                self._deliver(h, h.early.pop(0))

    def _deliver(self, h: Handle, ev: Event) -> None:
        m, now = self.metrics, time.perf_counter()
        if ev.tokens and not h.t_first:
            h.t_first = now
            self.prefilling[h.prefill] -= 1
            m.ttft.observe(now - h.t_submit)
        if ev.finish:
            if ev.tokens > 1 and ev.finish != "error":
                m.tpot.observe((now - h.t_first) / (ev.tokens - 1))
            m.requests.labels(ev.finish).inc()
        h.events.put_nowait(ev)
        if ev.finish:
            self._finish(h)

    def _on_gone(self, rank: int, why: str) -> None:
        if rank in self.dead or rank in self.stopped:
            return
        log.error("worker rank %d is gone: %s", rank, why)
        self.dead[rank] = why
        for h in list(self.live.values()):
            if rank in (h.prefill, h.decode) or h in self.pending:
                h.events.put_nowait(Event(h.rid, finish="error", error=f"worker rank {rank} failed: {why}"))
                self.metrics.requests.labels("error").inc()
                if h in self.pending:
                    self.pending.remove(h)
                self._finish(h)
