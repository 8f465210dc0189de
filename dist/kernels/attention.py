"""Block attention with log-sum-exp: forward, backward, autograd wrapper; torch and Triton backends.

Layout everywhere: q [batch, seq_q, heads_q, dim]; k, v [batch, seq_k, heads_kv, dim] (GQA not
expanded, heads_q a multiple of heads_kv); out like q; lse float32 [batch, heads_q, seq_q].

Causal masking with an offset: query row i may attend key column j iff j <= i + causal_offset.
offset 0 is top-left aligned (ordinary causal when seq_q == seq_k); in a ring step it is
q_start - k_start in global positions. A row that sees no key gets out = 0 and lse = -inf.

Varlen: with cu_seqlens_q / cu_seqlens_k (int32 [n_docs + 1], batch == 1), document n holds the
rows cu_seqlens_q[n]:cu_seqlens_q[n+1] and attends only to keys cu_seqlens_k[n]:cu_seqlens_k[n+1];
causal positions (and the offset) are counted from the start of each document.

Backends ("auto" | "torch" | "math" | "triton"):
  triton - Triton kernels (dist/kernels/triton_attention.py); "auto" picks them for CUDA tensors when
           triton is installed. Forcing it on CPU tensors needs TRITON_INTERPRET=1 (tests).
  torch  - ATen's CPU flash kernel (returns the logsumexp; its backward accepts an external out/lse)
           on CPU; causal offsets are handled by splitting the key block into a fully visible part and
           a top-left causal part, merged with `merge_attention`. Other devices fall back to "math".
  math   - plain matmul/softmax in chunks of query rows, accumulating in float32 (float64 for float64).
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch

from .merge import merge_attention

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "torch", "math", "triton")
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# validation (all of it happens before any kernel runs)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} != q device {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch {k.shape[0]} != q batch {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head_dim {k.shape[3]} != q head_dim {q.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]})")


_CU_VALUES: dict = {}  # id(cu_seqlens) -> (weak reference, its values as a list)


def _remember(cu: torch.Tensor, vals: list) -> None:
    key = id(cu)
    _CU_VALUES[key] = (weakref.ref(cu, lambda _: _CU_VALUES.pop(key, None)), vals)


def cu_seqlens(lengths, device=None) -> torch.Tensor:
    """cu_seqlens (int32 [n + 1], cumulative) for documents of these lengths. The kernels know its values
    without reading them back from the device, which on a GPU is a host sync per call. A tensor made
    otherwise is read once, at its first call; neither may be modified in place afterwards."""
    vals = [0, *itertools.accumulate(int(n) for n in lengths)]
    cu = torch.tensor(vals, dtype=torch.int32, device=device)
    _remember(cu, vals)
    return cu


def _check_cu(name, cu, seq, batch):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor [n_docs + 1]")
    if batch != 1:
        raise ValueError(f"{name} needs packed input with batch == 1, got batch {batch}")
    known = _CU_VALUES.get(id(cu))
    if known is not None and known[0]() is cu:
        vals = known[1]
    else:
        vals = cu.tolist()
        _remember(cu, vals)
    if vals[0] != 0 or vals[-1] != seq:
        raise ValueError(f"{name} must start at 0 and end at the sequence length {seq}, got {vals[0]}..{vals[-1]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    return vals


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k):
    """Returns None (dense) or the two cumulative-length lists."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return None
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[1], q.shape[0])
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[1], k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq) - 1} documents but cu_seqlens_k has {len(ck) - 1}")
    return cq, ck


def _check_scalars(causal_offset, backend):
    if not isinstance(causal_offset, int) or isinstance(causal_offset, bool):
        raise ValueError(f"causal_offset must be an int, got {causal_offset!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _scale(softmax_scale, dim):
    return 1.0 / math.sqrt(dim) if softmax_scale is None else float(softmax_scale)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend, t):
    if backend == "auto":
        if t.is_cuda and t.dtype != torch.float64 and triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the 'triton' package (extra: triton)")
        if t.dtype == torch.float64:
            raise ValueError("backend='triton' supports float16/bfloat16/float32, not float64")
    return backend


# ----------------------------------------------------------------------------------------------
# torch path: one dense block, decomposed into top-left-causal / non-causal parts


def _parts(seq_q, seq_k, causal, offset):
    """Split one (q, k) block into parts (q0, q1, k0, k1, top_left_causal) with no offset left.

    Row i sees column j iff j <= i + offset: columns < offset are seen by every row (non-causal
    part); the rest is top-left causal relative to (0, offset) or, for offset < 0, to (-offset, 0).
    """
    if seq_q == 0 or seq_k == 0:
        return []
    if not causal or offset >= seq_k - 1:
        return [(0, seq_q, 0, seq_k, False)]
    if offset <= -seq_q:
        return []
    if offset > 0:
        return [(0, seq_q, 0, offset, False), (0, seq_q, offset, seq_k, True)]
    return [(-offset, seq_q, 0, seq_k, True)]


def _flash_cpu_ok(t):
    return t.device.type == "cpu"


def _math_fwd(q, k, v, scale, causal):
    """q [b, sq, hq, d], k/v [b, sk, hkv, d], top-left causal -> out [b, sq, hq, d] (acc dtype), lse [b, hq, sq]."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.permute(0, 2, 1, 3).reshape(b, hkv, rep, sq, d)  # no K/V copy for GQA: broadcast
    kh = k.permute(0, 2, 1, 3).unsqueeze(2).to(acc)  # [b, hkv, 1, sk, d]
    vh = v.permute(0, 2, 1, 3).unsqueeze(2).to(acc)
    out = torch.empty(b, hkv, rep, sq, d, dtype=acc, device=q.device)
    lse = torch.empty(b, hkv, rep, sq, dtype=acc, device=q.device)
    chunk = max(1, (1 << 22) // max(1, b * hq * sk))
    for c0 in range(0, sq, chunk):
        c1 = min(sq, c0 + chunk)
        kend = min(sk, c1) if causal else sk
        s = (qh[:, :, :, c0:c1].to(acc) @ kh[:, :, :, :kend].transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(c0, c1, device=q.device).unsqueeze(1)
            cols = torch.arange(kend, device=q.device).unsqueeze(0)
            s = s.masked_fill(cols > rows, _NEG_INF)
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l.masked_fill(l == _NEG_INF, float("inf")).unsqueeze(-1))
        out[:, :, :, c0:c1] = p @ vh[:, :, :, :kend]
        lse[:, :, :, c0:c1] = l
    return out.reshape(b, hq, sq, d).transpose(1, 2), lse.reshape(b, hq, sq).float()


def _math_bwd(dout, q, k, v, out, lse, scale, causal):
    """Gradients of one top-left causal/non-causal block given (global) out and lse."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    def heads(t, r):
        return t.permute(0, 2, 1, 3).reshape(b, hkv, r, t.shape[1], d).to(acc)

    qh, doh = heads(q, rep), heads(dout, rep)
    kh, vh = heads(k, 1), heads(v, 1)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).reshape(b, hkv, rep, sq)
    lse_bw = lse.to(acc).masked_fill(lse == _NEG_INF, float("inf")).reshape(b, hkv, rep, sq)
    dq = torch.empty(b, hkv, rep, sq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hkv, 1, sk, d, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    chunk = max(1, (1 << 22) // max(1, b * hq * sk))
    for c0 in range(0, sq, chunk):
        c1 = min(sq, c0 + chunk)
        kend = min(sk, c1) if causal else sk
        s = (qh[:, :, :, c0:c1] @ kh[:, :, :, :kend].transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(c0, c1, device=q.device).unsqueeze(1)
            cols = torch.arange(kend, device=q.device).unsqueeze(0)
            s = s.masked_fill(cols > rows, _NEG_INF)
        p = torch.exp(s - lse_bw[:, :, :, c0:c1].unsqueeze(-1))  # [b, hkv, rep, c, kend]
        do_c = doh[:, :, :, c0:c1]
        dv[:, :, :, :kend] += (p.transpose(-1, -2) @ do_c).sum(2, keepdim=True)
        dp = do_c @ vh[:, :, :, :kend].transpose(-1, -2)
        ds = p * (dp - delta[:, :, :, c0:c1].unsqueeze(-1)) * scale
        dq[:, :, :, c0:c1] = ds @ kh[:, :, :, :kend]
        dk[:, :, :, :kend] += (ds.transpose(-1, -2) @ qh[:, :, :, c0:c1]).sum(2, keepdim=True)
    dq = dq.reshape(b, hq, sq, d).transpose(1, 2)
    return dq, dk.reshape(b, hkv, sk, d).transpose(1, 2), dv.reshape(b, hkv, sk, d).transpose(1, 2)


def _block_fwd(q, k, v, scale, causal, use_flash):
    # ATen's CPU flash kernel, called by its op name: no public torch API returns attention's
    # log-sum-exp on CPU, and ring attention must merge partial results by it (see NOTES.md)
    if use_flash:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return o.transpose(1, 2), l.float()
    return _math_fwd(q, k, v, scale, causal)


def _block_bwd(dout, q, k, v, out, lse, scale, causal, use_flash):
    if use_flash:
        lse_bw = lse.masked_fill(lse == _NEG_INF, float("inf"))
        lse_bw = lse_bw.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        t = lambda x: x.transpose(1, 2)  # noqa: E731  [b, s, h, d] -> [b, h, s, d] view
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(dout.to(q.dtype)), t(q), t(k), t(v), t(out.to(q.dtype)), lse_bw, 0.0, causal, scale=scale)
        return t(dq), t(dk), t(dv)
    return _math_bwd(dout, q, k, v, out, lse, scale, causal)


def _torch_fwd_dense(q, k, v, scale, causal, offset, use_flash):
    """One (q, k) block -> out [b, sq, hq, d] (q.dtype, contiguous), lse float32 [b, hq, sq]."""
    b, sq, hq, d = q.shape
    result = None  # (q0, q1, out, lse); a second part covers the same rows and is merged in
    for q0, q1, k0, k1, top_left in _parts(sq, k.shape[1], causal, offset):
        o, l = _block_fwd(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], scale, top_left, use_flash)
        if result is not None:
            assert result[:2] == (q0, q1)
            o, l = merge_attention(result[2].to(torch.promote_types(result[2].dtype, torch.float32)), result[3], o, l)
        result = (q0, q1, o, l)
    if result is not None and result[:2] == (0, sq):
        return result[2].to(q.dtype).contiguous(), result[3]
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((b, hq, sq), _NEG_INF, dtype=torch.float32, device=q.device)
    if result is not None:
        q0, q1, o, l = result
        out[:, q0:q1] = o
        lse[:, :, q0:q1] = l
    return out, lse


def _torch_bwd_dense(dout, q, k, v, out, lse, scale, causal, offset, use_flash):
    """One (q, k) block -> dq like q, dk like k, dv like v (contiguous)."""
    parts = _parts(q.shape[1], k.shape[1], causal, offset)
    if len(parts) == 1 and parts[0][:4] == (0, q.shape[1], 0, k.shape[1]):
        g = _block_bwd(dout, q, k, v, out, lse, scale, parts[0][4], use_flash)
        return tuple(x.to(q.dtype).contiguous() for x in g)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for q0, q1, k0, k1, top_left in parts:
        g = _block_bwd(dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1],
                       lse[:, :, q0:q1], scale, top_left, use_flash)
        dq[:, q0:q1] += g[0]
        dk[:, k0:k1] += g[1]
        dv[:, k0:k1] += g[2]
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def _doc_slices(varlen, q, k):
    if varlen is None:
        return [(0, q.shape[1], 0, k.shape[1])]
    cq, ck = varlen
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


# ----------------------------------------------------------------------------------------------
# public API


def attention_forward(q, k, v, *, causal=True, softmax_scale=None, causal_offset=0,
                      cu_seqlens_q=None, cu_seqlens_k=None, backend="auto"):
    """Attention with log-sum-exp.

    q: [batch, seq_q, heads_q, dim]; k, v: [batch, seq_k, heads_kv, dim] (heads_q % heads_kv == 0).
    Returns out [batch, seq_q, heads_q, dim] (q.dtype) and lse float32 [batch, heads_q, seq_q].
    See the module docstring for causal_offset, cu_seqlens_* and backend.
    """
    _check_qkv(q, k, v)
    _check_scalars(causal_offset, backend)
    varlen = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k)
    scale = _scale(softmax_scale, q.shape[-1])
    backend = _resolve_backend(backend, q)
    if backend == "triton":
        from .triton_attention import triton_forward
        return triton_forward(q, k, v, scale, causal, causal_offset, cu_seqlens_q, cu_seqlens_k, varlen)
    use_flash = backend == "torch" and _flash_cpu_ok(q)
    if varlen is None:
        return _torch_fwd_dense(q, k, v, scale, causal, causal_offset, use_flash)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    for q0, q1, k0, k1 in _doc_slices(varlen, q, k):
        out[:, q0:q1], lse[:, :, q0:q1] = _torch_fwd_dense(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], scale, causal,
                                                           causal_offset, use_flash)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, *, causal=True, softmax_scale=None, causal_offset=0,
                       cu_seqlens_q=None, cu_seqlens_k=None, backend="auto", delta=None):
    """Gradients of attention given its output and lse (which may be the global, merged ones of a ring).

    dout, out: [batch, seq_q, heads_q, dim]; lse float32 [batch, heads_q, seq_q].
    P = exp(S * scale - lse), D = rowsum(dout * out); rows with lse = -inf contribute nothing.
    delta: optional D itself, float32 [batch, heads_q, seq_q] (see `attention_delta`); when given,
    `out` is not needed and may be None (a ring then sends D instead of out: 1 value per row and
    head instead of dim).
    Returns dq like q, dk / dv like k / v (summed over each GQA group).
    """
    _check_qkv(q, k, v)
    _check_scalars(causal_offset, backend)
    expected = (q.shape[0], q.shape[2], q.shape[1])
    if delta is not None:
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != expected:
            raise ValueError(f"delta must have shape [batch, heads_q, seq_q] = {expected}")
        if delta.dtype not in (torch.float32, torch.float64) or delta.device != q.device:
            raise ValueError(f"delta must be float32 on {q.device}, got {delta.dtype} on {delta.device}")
    elif out is None:
        raise ValueError("out must be given unless delta is")
    for name, t in [("dout", dout)] + ([("out", out)] if out is not None else []):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} != q device {q.device}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [batch, heads_q, seq_q] = {expected}")
    if lse.dtype not in (torch.float32, torch.float64) or lse.device != q.device:
        raise ValueError(f"lse must be float32 on {q.device}, got {lse.dtype} on {lse.device}")
    varlen = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k)
    scale = _scale(softmax_scale, q.shape[-1])
    backend = _resolve_backend(backend, q)
    if backend == "triton":
        from .triton_attention import triton_backward
        return triton_backward(dout, q, k, v, out, lse.float(), scale, causal, causal_offset,
                               cu_seqlens_q, cu_seqlens_k, varlen, delta=delta)
    if delta is not None:  # these kernels derive D from out themselves
        out = _out_for_delta(dout, delta)
    use_flash = backend == "torch" and _flash_cpu_ok(q)
    if varlen is None:
        return _torch_bwd_dense(dout, q, k, v, out, lse, scale, causal, causal_offset, use_flash)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    for q0, q1, k0, k1 in _doc_slices(varlen, q, k):
        dq[:, q0:q1], dk[:, k0:k1], dv[:, k0:k1] = _torch_bwd_dense(
            dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1], lse[:, :, q0:q1], scale, causal,
            causal_offset, use_flash)
    return dq, dk, dv


def attention_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """D = rowsum(dout * out): dout, out [batch, seq, heads, dim] -> float32 [batch, heads, seq]
    (float64 for float64), what `attention_backward(..., delta=D)` takes instead of out."""
    acc = torch.float64 if torch.float64 in (dout.dtype, out.dtype) else torch.float32
    return torch.linalg.vecdot(dout.to(acc), out.to(acc)).transpose(1, 2)


def _out_for_delta(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in for out with rowsum(dout * out) = delta, for kernels that take out rather than D.

    It is the projection of out onto dout (dout * D / |dout|^2 per row and head; 0 where dout is 0,
    where D is 0 too): D is all that out is used for in the backward. [batch, seq, heads, dim], dout.dtype.
    """
    acc = torch.float64 if torch.float64 in (dout.dtype, delta.dtype) else torch.float32
    d = dout.to(acc)
    norm2 = torch.linalg.vecdot(d, d)  # [batch, seq, heads]
    scale = delta.to(acc).transpose(1, 2) / norm2
    scale = scale.masked_fill(norm2 == 0, 0.0)
    return (d * scale.unsqueeze(-1)).to(dout.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, causal_offset, cu_seqlens_q, cu_seqlens_k, backend):
        out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     causal_offset=causal_offset, cu_seqlens_q=cu_seqlens_q,
                                     cu_seqlens_k=cu_seqlens_k, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = dict(causal=causal, softmax_scale=softmax_scale, causal_offset=causal_offset,
                        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, backend=backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, **ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q, k, v, *, causal=True, softmax_scale=None, causal_offset=0,
              cu_seqlens_q=None, cu_seqlens_k=None, backend="auto"):
    """Differentiable attention. q: [batch, seq_q, heads_q, dim]; k, v: [batch, seq_k, heads_kv, dim]
    -> out [batch, seq_q, heads_q, dim]. The default `attn_fn` of the model (single device)."""
    return _Attention.apply(q, k, v, causal, softmax_scale, causal_offset, cu_seqlens_q, cu_seqlens_k, backend)
