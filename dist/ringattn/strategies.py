"""The three ways to compute attention over a sequence sharded across a process group.

Notation: P ranks in group order form the ring; rank r holds queries Q_r and keys/values KV_r of
its shard (L local tokens, layout "zigzag" or "contiguous", see layout.py); next = r+1, prev = r-1
(mod P). Block attention and the merge of partial results come from dist.kernels only. All
messages go through dist.comm.Exchange, posted before the step's compute and waited after it;
each direction between two ranks rides its own process group (the group and its twin), so
traffic both ways over a link proceeds at once on gloo (ranks on one host use dist.comm's shared
memory instead).

tokenring  KV never moves. Q travels one hop per step towards prev (Q_a visits a-1, a-2, ...,
           a+1), carrying only the query rows that its remaining holders need (with zigzag +
           causal, half of them after the wrap). The partial (out, lse) a holder computed for Q_a in
           the previous step goes straight back to a, so both directions of the links carry data.
           Backward: Q, dO and the row statistics (lse, D = rowsum(dO * out)) travel the same way
           (D instead of out: 1 value per row and head instead of head_dim), dK/dV accumulate where
           K/V live, each partial dQ goes straight back to its owner.
ring       KV travels one hop per step towards next; in backward dK/dV accumulators (fp32) follow
           one step behind as a second stream (tag 1) and arrive at their owner after P hops.
allgather  all-gather KV, compute locally; backward sends each rank's dK/dV share back with one
           all-to-all (a reduce-scatter).

Each is a torch.autograd.Function: forward(q, k, v, spec) -> out, differentiable in q, k, v.
"""

from __future__ import annotations

import torch

from dist import comm
from dist.kernels import attention_backward, attention_delta, attention_forward, merge_attention

from dist.plan import block, diag_parts, q_needed, relay_start


class RingSpec:
    """What every step needs to know: group, ring position, sizes, masking."""

    def __init__(self, group, layout: str, causal: bool, scale: float, local_len: int):
        self.group = group
        self.world = comm.group_size(group)
        self.rank = comm.group_rank(group)
        self.layout = layout
        self.causal = causal
        self.scale = scale
        self.n = local_len
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        self.twin = comm.twin_group(group) if self.world > 1 else None
        self.diag_tail = 0.0  # TokenRing: rows of the local block left to hide the last return (layout.diag_tail)

    def block(self, a: int, b: int):
        return block(a, b, self.n, self.layout, self.causal)

    def relay_start(self, a: int, holder: int) -> int:
        return relay_start(a, holder, self.world, self.n, self.layout, self.causal)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Acc:
    """Running (out, lse) of this rank's queries: out fp32 [b, n, hq, d], lse fp32 [b, hq, n].

    The first partial result that covers every row is taken over as it is; only when the first one
    covers some rows are buffers allocated (out 0, lse -inf) and merged into."""

    def __init__(self, q: torch.Tensor):
        self.shape, self.dtype, self.device = q.shape, _acc_dtype(q), q.device
        self.out = self.lse = None

    def merge(self, start: int, block_out, block_lse) -> None:
        """Fold in a partial result for query rows [start, start + rows)."""
        stop = start + block_out.shape[1]
        if self.out is None:
            if start == 0 and stop == self.shape[1]:
                self.out, self.lse = block_out.to(self.dtype), block_lse.to(self.dtype)
                return
            self._allocate()
        merge_attention(self.out[:, start:stop], self.lse[:, :, start:stop], block_out, block_lse, inplace=True)

    def _allocate(self) -> None:
        b, n, h, _ = self.shape
        self.out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.lse = torch.full((b, h, n), float("-inf"), dtype=self.dtype, device=self.device)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(out in `dtype`, lse float32)."""
        if self.out is None:  # no block at all (cannot happen with a rank's own block; kept total)
            self._allocate()
        return self.out.to(dtype), self.lse.float()


class _Sum:
    """A gradient summed from row blocks into one fp32 tensor shaped like `like` [b, n, ...]: the first
    block is taken over (when it covers every row) or copied in with the other rows zeroed; later
    blocks are added. Saves the zero-filled buffer and one pass over it."""

    def __init__(self, like: torch.Tensor):
        self.shape, self.dtype, self.device = like.shape, _acc_dtype(like), like.device
        self.t = None

    def add(self, start: int, value: torch.Tensor) -> None:
        stop = start + value.shape[1]
        if self.t is not None:
            self.t[:, start:stop] += value
        elif start == 0 and stop == self.shape[1]:
            self.t = value.to(self.dtype)
        else:
            self.t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.t[:, :start].zero_()
            self.t[:, stop:].zero_()
            self.t[:, start:stop] = value

    def get(self) -> torch.Tensor:
        if self.t is None:
            self.t = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.t


def _fwd_block(spec: RingSpec, q_rows, k, v, blk):
    """q_rows: the block's query rows [b, n - q_start, hq, d]. Returns (out, lse) of the block."""
    return attention_forward(q_rows, k[:, blk.k_start:blk.k_stop], v[:, blk.k_start:blk.k_stop],
                             causal=blk.causal, softmax_scale=spec.scale)


def _bwd_block(spec: RingSpec, dout, q_rows, k, v, out, lse, blk, delta=None):
    """Returns (dQ of the block's rows, dK, dV of keys [blk.k_start, blk.k_stop)).
    delta (D = rowsum(dout * out)) may stand in for out (then None)."""
    ks, ke = blk.k_start, blk.k_stop
    return attention_backward(dout, q_rows, k[:, ks:ke], v[:, ks:ke], out, lse, delta=delta,
                              causal=blk.causal, softmax_scale=spec.scale)


# ----------------------------------------------------------------------------------------------
# TokenRing


def _empty_rows(spec_rows, batch: int, rows: int, device) -> list[torch.Tensor]:
    """Receive buffers [batch, rows, *shape] for row tensors described by (shape, dtype) pairs."""
    return [torch.empty(batch, rows, *shape, dtype=dtype, device=device) for shape, dtype in spec_rows]


def _tokenring_pass(spec: RingSpec, own: list[torch.Tensor], compute, local, result_spec, label_q: str,
                    label_back: str, merge):
    """The TokenRing schedule, shared by forward and backward.

    own: this rank's row tensors [b, n, ...] that travel (Q, or Q/dO/stats), one message each (a
    slice of rows of a contiguous tensor is sent as it is when b == 1, no packing copy). At step
    t >= 1 the rank holds rows [held_start:] of Q_a (a = rank + t) and calls
    compute(a, held_start, held) -> list of result row tensors [b, rows, ...] (described by
    result_spec) for rows [block.q_start:], or None when the mask leaves nothing; they go straight
    back to a one step later, where merge(start, results) folds them in. The local (diagonal) block
    is computed by local(q_start, k_start, k_stop) for each part of `diag_parts`: the first while
    the first Q is in flight, the second (spec.diag_tail of the rows) while the last results travel
    back, so no message is left exposed.
    """
    p, r, n = spec.world, spec.rank, spec.n
    spec_rows = [(tuple(x.shape[2:]), x.dtype) for x in own]
    b, device = own[0].shape[0], own[0].device
    parts = diag_parts(n, spec.causal, spec.diag_tail if p > 1 else 0.0)
    held_a, held_start, held = r, 0, own
    pending = None  # (owner, results) computed in the previous step, to be sent back
    for t in range(p + 1):  # step p only returns the last results (and computes the rest of the diagonal)
        ex = comm.Exchange(spec.group)
        incoming = back = None
        if t < p - 1:  # forward the held Q towards prev, receive the next one from next
            send_start = spec.relay_start(held_a, r)
            assert send_start >= held_start, "a relay never needs rows it did not receive"
            for x in held if send_start < n else ():
                ex.send(x[:, send_start - held_start:].contiguous(), spec.prev, label_q)
            next_a = (r + t + 1) % p
            recv_start = spec.relay_start(next_a, spec.next)
            incoming = (next_a, recv_start, _empty_rows(spec_rows, b, n - recv_start, device))
            for buf in incoming[2]:
                ex.recv(buf, spec.next)
        if pending is not None:  # results of the previous step go back to their owner
            for x in pending[1]:
                ex.send(x, pending[0], label_back, tag=1)
            pending = None
        if t >= 2:  # and ours come back from the rank that held our Q in the previous step
            holder = (r - (t - 1)) % p
            start = q_needed(r, holder, n, spec.layout, spec.causal)
            back = (start, _empty_rows(result_spec, b, n - start, device))
            for buf in back[1]:
                ex.recv(buf, holder, tag=1)
        ex.start()

        if t == 0:
            local(*parts[0])
        elif t < p:
            results = compute(held_a, held_start, held)
            pending = (held_a, results) if results is not None else None
        elif len(parts) > 1:
            local(*parts[1])

        ex.wait()
        if back is not None and back[0] < n:
            merge(back[0], back[1])
        if incoming is not None:
            held_a, held_start = incoming[0], incoming[1]
            held = incoming[2] if held_start < n else None
        if p == 1:
            break


class TokenRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        acc = _Acc(q)
        r = spec.rank
        b, n, hq, d = q.shape

        def compute(a, held_start, held):
            blk = spec.block(a, r)
            if blk is None:
                return None
            o, l = _fwd_block(spec, held[0][:, blk.q_start - held_start:], k, v, blk)
            return [o, l.transpose(1, 2).contiguous()]  # lse rows first, like every travelling tensor

        def local(qs, ks, ke):
            o, l = attention_forward(q[:, qs:], k[:, ks:ke], v[:, ks:ke], causal=spec.causal,
                                     softmax_scale=spec.scale)
            acc.merge(qs, o, l)

        def merge(start, results):
            acc.merge(start, results[0], results[1].transpose(1, 2))

        result_spec = [((hq, d), q.dtype), ((hq,), torch.float32)]
        _tokenring_pass(spec, [q], compute, local, result_spec, "q", "out", merge)
        out, lse = acc.result(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        spec = ctx.spec
        r = spec.rank
        dq, dk, dv = _Sum(q), _Sum(k), _Sum(v)
        dout = dout.contiguous().to(q.dtype)

        def compute(a, held_start, held):
            blk = spec.block(a, r)
            if blk is None:
                return None
            s = blk.q_start - held_start
            q_a, do_a, stats_a = (x[:, s:] for x in held)
            lse_a, delta_a = stats_a[:, :, 0].transpose(1, 2), stats_a[:, :, 1].transpose(1, 2)
            dq_a, dk_b, dv_b = _bwd_block(spec, do_a, q_a, k, v, None, lse_a, blk, delta=delta_a)
            dk.add(blk.k_start, dk_b)
            dv.add(blk.k_start, dv_b)
            return [dq_a]

        def local(qs, ks, ke):
            g = attention_backward(dout[:, qs:], q[:, qs:], k[:, ks:ke], v[:, ks:ke], out[:, qs:],
                                   lse[:, :, qs:], causal=spec.causal, softmax_scale=spec.scale)
            dq.add(qs, g[0])
            dk.add(ks, g[1])
            dv.add(ks, g[2])

        def merge(start, results):
            dq.add(start, results[0])

        result_spec = [(tuple(q.shape[2:]), q.dtype)]
        # Q, dO and the row statistics (lse, D = rowsum(dO * out)) travel; out stays home
        delta = attention_delta(dout, out).to(lse.dtype)
        stats = torch.stack((lse, delta), dim=1).permute(0, 3, 1, 2).contiguous()  # [b, n, 2, hq]
        _tokenring_pass(spec, [q, dout, stats], compute, local, result_spec, "q", "dq", merge)
        return dq.get().to(q.dtype), dk.get().to(k.dtype), dv.get().to(v.dtype), None


# ----------------------------------------------------------------------------------------------
# KV ring


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        p, r = spec.world, spec.rank
        acc = _Acc(q)
        held = [k, v]  # K and V travel as two messages (no packing copy)
        for t in range(p):
            ex = comm.Exchange(spec.group)
            incoming = None
            if t < p - 1:
                incoming = [torch.empty_like(x) for x in held]
                for buf, x in zip(incoming, held):
                    ex.send(x, spec.next, "kv")
                    ex.recv(buf, spec.prev)
            ex.start()
            blk = spec.block(r, (r - t) % p)
            if blk is not None:
                o, l = _fwd_block(spec, q[:, blk.q_start:], *held, blk)
                acc.merge(blk.q_start, o, l)
            ex.wait()
            if incoming is not None:
                held = incoming
        out, lse = acc.result(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        spec = ctx.spec
        p, r = spec.world, spec.rank
        acc = _acc_dtype(q)
        dout = dout.contiguous().to(q.dtype)
        dq = _Sum(q)
        held = [k, v]
        sending = None  # Exchange carrying the previous step's dK/dV accumulator to next
        for t in range(p):
            ex = comm.Exchange(spec.group)
            incoming = None
            if t < p - 1:
                incoming = [torch.empty_like(x) for x in held]
                for buf, x in zip(incoming, held):
                    ex.send(x, spec.next, "kv")
                    ex.recv(buf, spec.prev)
            acc_in = None
            if t >= 1:  # the accumulator for the KV we hold now, from prev
                acc_in = [torch.empty(x.shape, dtype=acc, device=x.device) for x in (k, v)]
                for buf in acc_in:
                    ex.recv(buf, spec.prev, tag=1)
            ex.start()
            dk_b, dv_b = _Sum(k), _Sum(v)  # this step's dK/dV of the KV we hold
            blk = spec.block(r, (r - t) % p)
            if blk is not None:
                s = blk.q_start
                g = _bwd_block(spec, dout[:, s:], q[:, s:], *held, out[:, s:], lse[:, :, s:], blk)
                dq.add(s, g[0])
                dk_b.add(blk.k_start, g[1])
                dv_b.add(blk.k_start, g[2])
            ex.wait()
            if sending is not None:
                sending.wait()
            if acc_in is not None:
                dk_b.add(0, acc_in[0])
                dv_b.add(0, acc_in[1])
            dk_b, dv_b = dk_b.get(), dv_b.get()
            sending = comm.Exchange(spec.group)
            if p > 1:
                sending.send(dk_b, spec.next, "dkv", tag=1).send(dv_b, spec.next, "dkv", tag=1)
            sending.start()
            if incoming is not None:
                held = incoming
        if p == 1:
            dk, dv = dk_b, dv_b
        else:  # our own accumulator, complete after visiting every rank
            dk, dv = (torch.empty(x.shape, dtype=acc, device=x.device) for x in (k, v))
            ex = comm.Exchange(spec.group)
            ex.recv(dk, spec.prev, tag=1).recv(dv, spec.prev, tag=1)
            ex.start()
            ex.wait()
            sending.wait()
        return dq.get().to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# ----------------------------------------------------------------------------------------------
# all-gather


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        p, r = spec.world, spec.rank
        acc = _Acc(q)
        kv_spec = comm.row_spec([k, v])
        packed = comm.pack_rows([k, v])
        assert len(packed) == 1
        kvs = comm.all_gather(packed[0], spec.group, "kv") if p > 1 else packed
        for b in range(p):
            blk = spec.block(r, b)
            if blk is not None:
                k_b, v_b = comm.unpack_rows([kvs[b]], kv_spec)
                o, l = _fwd_block(spec, q[:, blk.q_start:], k_b, v_b, blk)
                acc.merge(blk.q_start, o, l)
        out, lse = acc.result(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.kvs = kvs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        spec, kvs = ctx.spec, ctx.kvs
        ctx.kvs = None
        p, r = spec.world, spec.rank
        acc = _acc_dtype(q)
        dout = dout.contiguous().to(q.dtype)
        kv_spec = comm.row_spec([k, v])
        dq = _Sum(q)
        dkv = torch.zeros((p, *k.shape[:2], 2 * k.shape[2] * k.shape[3]), dtype=acc, device=k.device)  # [P, b, n, 2*hkv*d]
        for b in range(p):
            blk = spec.block(r, b)
            if blk is None:
                continue
            k_b, v_b = comm.unpack_rows([kvs[b]], kv_spec)
            dk_b, dv_b = comm.unpack_rows([dkv[b]], [(tuple(k.shape[2:]), acc)] * 2)
            s, ks, ke = blk.q_start, blk.k_start, blk.k_stop
            g = _bwd_block(spec, dout[:, s:], q[:, s:], k_b, v_b, out[:, s:], lse[:, :, s:], blk)
            dq.add(s, g[0])
            dk_b[:, ks:ke] += g[1]
            dv_b[:, ks:ke] += g[2]
        summed = (comm.all_to_all(dkv, spec.group, "dkv") if p > 1 else dkv).sum(0)
        dk, dv = comm.unpack_rows([summed], [(tuple(k.shape[2:]), acc)] * 2)
        return dq.get().to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


STRATEGIES = {"tokenring": TokenRingAttention, "ring": RingAttention, "allgather": AllGatherAttention}
