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

Packed sequences (cu_seqlens): every sequence is split in the layout on its own, so at each step all
of a rank's sequences stand in the same block relation to the peer's. One pass carries them all: a
block's rows are a `Rows` set (a range of each sequence), travel as one message per tensor and go
through one varlen kernel call; the schedule and its message count do not depend on how many
sequences there are.

Each is a torch.autograd.Function: forward(q, k, v, spec) -> out, differentiable in q, k, v.
"""

from __future__ import annotations


import torch

from dist import comm
from dist.kernels import attention_backward, attention_delta, attention_forward, cu_seqlens, merge_attention
from dist.plan import block, diag_parts, q_needed, relay_start


class Rows:
    """A set of a rank's local rows: rows [starts[i], stops[i]) of each packed sequence i, whose local
    lengths are `lengths` (one sequence: a plain slice, as an unpacked call has).

    Every sequence is split in the layout on its own, so at each ring step every sequence's rows stand
    in the same block relation to the peer's: one kernel call covers them all, with `cu` (int32
    [n + 1], the selected rows' cumulative lengths per sequence; None for one sequence) as its
    cu_seqlens. `take` gathers the rows into one tensor in sequence order (a view when they are one
    slice), which is also how they travel."""

    def __init__(self, lengths, starts, stops, device):
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        ranges = [(o + a, o + b) for o, a, b in zip(offsets, starts, stops)]
        self.sizes = [b - a for a, b in ranges]  # selected rows per sequence
        self.count = sum(self.sizes)
        self.full = self.count == offsets[-1]
        self.cu = None
        if len(lengths) > 1:
            self.cu = cu_seqlens(self.sizes, device)
        if self.count == 0:
            self.slice, self.index = slice(0, 0), None
        elif all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:])):  # one range
            self.slice, self.index = slice(ranges[0][0], ranges[-1][1]), None
        else:
            self.slice = None
            self.index = torch.cat([torch.arange(a, b, device=device) for a, b in ranges])

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The rows of x along `dim` (x [b, rows, ...], or lse [b, h, rows] with dim=2)."""
        if self.index is None:
            return x.narrow(dim, self.slice.start, self.count)
        return x.index_select(dim, self.index)

    def add_into(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """t[:, rows] += value (t [b, rows, ...])."""
        if self.index is None:
            t[:, self.slice] += value
        else:
            t.index_add_(1, self.index, value)


class PackedBlock:
    """dist.plan.block for every packed sequence at once: query rows `q` (a suffix of each sequence),
    key rows `k` (a range of each), `causal` only on the diagonal."""

    def __init__(self, q: Rows, k: Rows, causal: bool):
        self.q, self.k, self.causal = q, k, causal


class RingSpec:
    """What every step needs to know: group, ring position, the local lengths of the packed sequences
    (one for an unpacked call), masking; blocks and relay rows as Rows, built once per spec."""

    def __init__(self, group, world: int, rank: int, layout: str, causal: bool, scale: float, lengths: list[int],
                 device, diag_tail: float = 0.0):
        """world 1: a one-rank ring, no messages (group may then be None without torch.distributed)."""
        self.group, self.world, self.rank = group, world, rank
        self.layout, self.causal, self.scale = layout, causal, scale
        self.lengths, self.device = list(lengths), device
        self.n = sum(lengths)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        self.all = self.rows([0] * len(lengths))
        # TokenRing: rows of the local block left to hide the last return (dist.plan.diag_tail)
        self.diag_tail = diag_tail if self.world > 1 else 0.0
        self._cache: dict = {}

    def rows(self, starts, stops=None, lengths=None) -> Rows:
        lengths = self.lengths if lengths is None else lengths
        return Rows(lengths, starts, lengths if stops is None else stops, self.device)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def block(self, a: int, b: int) -> PackedBlock | None:
        """Queries of rank a with keys of rank b, for every sequence; None when the mask keeps nothing."""
        def make():
            blocks = [block(a, b, n, self.layout, self.causal) for n in self.lengths]
            if blocks[0] is None:
                return None
            return PackedBlock(self.rows([x.q_start for x in blocks]),
                               self.rows([x.k_start for x in blocks], [x.k_stop for x in blocks]), blocks[0].causal)
        return self._cached(("block", a, b), make)

    def relay(self, a: int, holder: int) -> Rows:
        """The rows of Q_a that `holder` forwards (dist.plan.relay_start of each sequence)."""
        return self._cached(("relay", a, holder), lambda: self.rows(
            [relay_start(a, holder, self.world, n, self.layout, self.causal) for n in self.lengths]))

    def needed(self, a: int, b: int) -> Rows:
        """The rows of Q_a that holder b computes with (dist.plan.q_needed of each sequence)."""
        return self._cached(("needed", a, b), lambda: self.rows(
            [q_needed(a, b, n, self.layout, self.causal) for n in self.lengths]))

    def within(self, held: Rows, wanted: Rows) -> Rows:
        """Where the rows `wanted` lie inside the rows `held` of a travelling Q (both suffixes of every
        sequence, wanted inside held: a relay never needs rows it did not receive)."""
        def make():
            assert all(w <= h for w, h in zip(wanted.sizes, held.sizes)), "wanted rows must be held"
            return self.rows([h - w for h, w in zip(held.sizes, wanted.sizes)], lengths=held.sizes)
        return self._cached(("within", tuple(held.sizes), tuple(wanted.sizes)), make)

    def diag_parts(self) -> list[PackedBlock]:
        """The own block in parts, each top-left causal or unmasked (dist.plan.diag_parts of every
        sequence); two parts only when every sequence splits."""
        def make():
            per_seq = [diag_parts(n, self.causal, self.diag_tail) for n in self.lengths]
            if any(len(p) != len(per_seq[0]) for p in per_seq):
                per_seq = [diag_parts(n, self.causal, 0.0) for n in self.lengths]
            return [PackedBlock(self.rows([p[i][0] for p in per_seq]),
                                self.rows([p[i][1] for p in per_seq], [p[i][2] for p in per_seq]), self.causal)
                    for i in range(len(per_seq[0]))]
        return self._cached("diag", make)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Acc:
    """Running (out, lse) of this rank's queries: out fp32 [b, n, hq, d], lse fp32 [b, hq, n].

    The first partial result that covers every row is taken over as it is; only when the first one
    covers some rows are buffers allocated (out 0, lse -inf) and merged into."""

    def __init__(self, q: torch.Tensor):
        self.shape, self.dtype, self.device = q.shape, _acc_dtype(q), q.device
        self.out = self.lse = None

    def merge(self, rows: Rows, block_out, block_lse) -> None:
        """Fold in a partial result (out [b, rows.count, hq, d], lse [b, hq, rows.count]) for `rows`."""
        if self.out is None:
            if rows.full:
                self.out, self.lse = block_out.to(self.dtype), block_lse.to(self.dtype)
                return
            self._allocate()
        if rows.index is None:  # views of the accumulator: merged in place
            merge_attention(rows.take(self.out), rows.take(self.lse, 2), block_out, block_lse, inplace=True)
            return
        out, lse = merge_attention(rows.take(self.out), rows.take(self.lse, 2), block_out, block_lse)
        self.out.index_copy_(1, rows.index, out)
        self.lse.index_copy_(2, rows.index, lse)

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
    block is taken over (when it covers every row) or added into zeros; later blocks are added."""

    def __init__(self, like: torch.Tensor):
        self.shape, self.dtype, self.device = like.shape, _acc_dtype(like), like.device
        self.t = None

    def add(self, rows: Rows, value: torch.Tensor) -> None:
        if self.t is None and rows.full:
            self.t = value.to(self.dtype)
            return
        rows.add_into(self.get(), value)

    def get(self) -> torch.Tensor:
        if self.t is None:
            self.t = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.t


def _fwd_block(spec: RingSpec, q_rows, k, v, blk: PackedBlock):
    """q_rows: the block's query rows [b, blk.q.count, hq, d]; k, v: the holder's whole shard.
    Returns (out, lse) of the block: one varlen kernel call for every packed sequence."""
    return attention_forward(q_rows, blk.k.take(k), blk.k.take(v), causal=blk.causal, softmax_scale=spec.scale,
                             cu_seqlens_q=blk.q.cu, cu_seqlens_k=blk.k.cu)


def _bwd_block(spec: RingSpec, dout, q_rows, k, v, out, lse, blk: PackedBlock, delta=None):
    """Returns (dQ of the block's query rows, dK, dV of its key rows blk.k).
    delta (D = rowsum(dout * out)) may stand in for out (then None)."""
    return attention_backward(dout, q_rows, blk.k.take(k), blk.k.take(v), out, lse, delta=delta,
                              causal=blk.causal, softmax_scale=spec.scale,
                              cu_seqlens_q=blk.q.cu, cu_seqlens_k=blk.k.cu)


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
    t >= 1 the rank holds rows `held_rows` of Q_a (a = rank + t; the suffix of each packed sequence
    that its remaining holders need) and calls compute(a, held_rows, held) -> list of result row
    tensors [b, rows, ...] (described by result_spec) for the block's query rows, or None when the
    mask leaves nothing; they go straight back to a one step later, where merge(rows, results) folds
    them in. The local (diagonal) block is computed by local(part) for each part of
    `spec.diag_parts()`: the first while the first Q is in flight, the second (spec.diag_tail of the
    rows) while the last results travel back, so no message is left exposed.
    """
    p, r = spec.world, spec.rank
    spec_rows = [(tuple(x.shape[2:]), x.dtype) for x in own]
    b, device = own[0].shape[0], own[0].device
    parts = spec.diag_parts()
    held_a, held_rows, held = r, spec.all, own
    pending = None  # (owner, results) computed in the previous step, to be sent back
    for t in range(p + 1):  # step p only returns the last results (and computes the rest of the diagonal)
        ex = comm.Exchange(spec.group)
        incoming = back = None
        if t < p - 1:  # forward the held Q towards prev, receive the next one from next
            send = spec.within(held_rows, spec.relay(held_a, r))
            for x in held if send.count else ():
                ex.send(send.take(x).contiguous(), spec.prev, label_q)
            next_a = (r + t + 1) % p
            recv_rows = spec.relay(next_a, spec.next)
            incoming = (next_a, recv_rows, _empty_rows(spec_rows, b, recv_rows.count, device))
            for buf in incoming[2]:
                ex.recv(buf, spec.next)
        if pending is not None:  # results of the previous step go back to their owner
            for x in pending[1]:
                ex.send(x, pending[0], label_back, tag=1)
            pending = None
        if t >= 2:  # and ours come back from the rank that held our Q in the previous step
            rows = spec.needed(r, (r - (t - 1)) % p)
            back = (rows, _empty_rows(result_spec, b, rows.count, device))
            for buf in back[1]:
                ex.recv(buf, (r - (t - 1)) % p, tag=1)
        ex.start()

        if t == 0:
            local(parts[0])
        elif t < p:
            results = compute(held_a, held_rows, held)
            pending = (held_a, results) if results is not None else None
        elif len(parts) > 1:
            local(parts[1])

        ex.wait()
        if back is not None and back[0].count:
            merge(back[0], back[1])
        if incoming is not None:
            held_a, held_rows = incoming[0], incoming[1]
            held = incoming[2] if held_rows.count else None
        if p == 1:
            break


class TokenRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        acc = _Acc(q)
        r = spec.rank
        b, n, hq, d = q.shape

        def compute(a, held_rows, held):
            blk = spec.block(a, r)
            if blk is None:
                return None
            o, l = _fwd_block(spec, spec.within(held_rows, blk.q).take(held[0]), k, v, blk)
            return [o, l.transpose(1, 2).contiguous()]  # lse rows first, like every travelling tensor

        def local(blk):
            o, l = _fwd_block(spec, blk.q.take(q), k, v, blk)
            acc.merge(blk.q, o, l)

        def merge(rows, results):
            acc.merge(rows, results[0], results[1].transpose(1, 2))

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

        def compute(a, held_rows, held):
            blk = spec.block(a, r)
            if blk is None:
                return None
            rows = spec.within(held_rows, blk.q)
            q_a, do_a, stats_a = (rows.take(x) for x in held)
            lse_a, delta_a = stats_a[:, :, 0].transpose(1, 2), stats_a[:, :, 1].transpose(1, 2)
            dq_a, dk_b, dv_b = _bwd_block(spec, do_a, q_a, k, v, None, lse_a, blk, delta=delta_a)
            dk.add(blk.k, dk_b)
            dv.add(blk.k, dv_b)
            return [dq_a]

        def local(blk):
            g = _bwd_block(spec, blk.q.take(dout), blk.q.take(q), k, v, blk.q.take(out), blk.q.take(lse, 2), blk)
            dq.add(blk.q, g[0])
            dk.add(blk.k, g[1])
            dv.add(blk.k, g[2])

        def merge(rows, results):
            dq.add(rows, results[0])

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
                o, l = _fwd_block(spec, blk.q.take(q), *held, blk)
                acc.merge(blk.q, o, l)
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
                rows = blk.q
                g = _bwd_block(spec, rows.take(dout), rows.take(q), *held, rows.take(out), rows.take(lse, 2), blk)
                dq.add(rows, g[0])
                dk_b.add(blk.k, g[1])
                dv_b.add(blk.k, g[2])
            ex.wait()
            if sending is not None:
                sending.wait()
            if acc_in is not None:
                dk_b.add(spec.all, acc_in[0])
                dv_b.add(spec.all, acc_in[1])
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
                o, l = _fwd_block(spec, blk.q.take(q), k_b, v_b, blk)
                acc.merge(blk.q, o, l)
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
            rows = blk.q
            g = _bwd_block(spec, rows.take(dout), rows.take(q), k_b, v_b, rows.take(out), rows.take(lse, 2), blk)
            dq.add(rows, g[0])
            blk.k.add_into(dk_b, g[1])  # views of dkv[b]
            blk.k.add_into(dv_b, g[2])
        summed = (comm.all_to_all(dkv, spec.group, "dkv") if p > 1 else dkv).sum(0)
        dk, dv = comm.unpack_rows([summed], [(tuple(k.shape[2:]), acc)] * 2)
        return dq.get().to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


STRATEGIES = {"tokenring": TokenRingAttention, "ring": RingAttention, "allgather": AllGatherAttention}
