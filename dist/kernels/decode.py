"""Decode attention over a paged KV cache, split over the KV length (flash-decoding).

One query token per sequence. The KV length of every sequence is cut into `num_splits` ranges of
whole pages; each (sequence, kv head, split) computes a partial (out, lse) for all the q heads of
its GQA group, and the partials are reduced with `merge_attention_splits` (the one merge). A single
long sequence therefore spreads over many programs instead of one.

Shapes: q [batch, heads_q, dim]; k_cache, v_cache [num_blocks, block_size, heads_kv, dim];
block_tables int32 [batch, max_blocks] (page ids; entries past a sequence's last page are ignored);
seq_lens int32 [batch] (0 allowed: out = 0). Returns out [batch, heads_q, dim] in q.dtype.
"""

from __future__ import annotations

import math

import torch

from .attention import _FLOAT_DTYPES, triton_available
from .merge import merge_attention_splits


def _validate(q, k_cache, v_cache, block_tables, seq_lens, num_splits, backend):
    for name, t, nd in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                        ("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} != q device {q.device}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be a float tensor, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    batch, heads_q, dim = q.shape
    num_blocks, block_size, heads_kv, kdim = k_cache.shape
    if kdim != dim:
        raise ValueError(f"k_cache head_dim {kdim} != q head_dim {dim}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k_cache heads ({heads_kv})")
    if block_tables.dtype != torch.int32 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be int32 [batch={batch}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must be int32 [batch={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def _validate_values(block_tables, seq_lens, num_blocks, block_size):
    """Lengths within the table and page ids within the cache for every used page (one device sync)."""
    lens = seq_lens.long()
    max_tokens = block_tables.shape[1] * block_size
    if bool(((lens < 0) | (lens > max_tokens)).any()):
        raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = {max_tokens}], got {seq_lens.tolist()}")
    used = torch.arange(block_tables.shape[1], device=lens.device)[None, :] * block_size < lens[:, None]
    pages = block_tables.long()
    if bool((used & ((pages < 0) | (pages >= num_blocks))).any()):
        raise ValueError(f"block_tables holds page ids outside [0, {num_blocks}) for used pages")


def _pick_splits(q, max_len, block_size, heads_kv, num_splits):
    """Number of KV splits: enough programs to fill the GPU (2 waves of SMs), at least 1 page each."""
    max_pages = max(1, math.ceil(max_len / block_size))
    if num_splits is None:
        if q.is_cuda:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = math.ceil(2 * sms / max(1, q.shape[0] * heads_kv))
        else:
            num_splits = math.ceil(max_len / 1024)  # CPU: splits only bound the working set
    return max(1, min(num_splits, max_pages))


def _torch_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, splits, pages_per_split):
    """Partial results [splits, batch, heads_q, dim] (fp32/fp64) and lse [splits, batch, heads_q]."""
    batch, heads_q, dim = q.shape
    _, block_size, heads_kv, _ = k_cache.shape
    rep = heads_q // heads_kv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_pages = splits * pages_per_split
    table = block_tables[:, :n_pages].long()
    if table.shape[1] < n_pages:  # pad: pages past the table are masked anyway
        table = torch.nn.functional.pad(table, (0, n_pages - table.shape[1]))
    pos = torch.arange(n_pages * block_size, device=q.device)
    visible = pos[None, :] < seq_lens.long()[:, None]  # [batch, tokens]
    table = torch.where(visible[:, ::block_size], table, torch.zeros_like(table))  # ignore unused entries
    tokens = n_pages * block_size
    # gather pages straight into [batch, heads_kv, tokens, dim] (one copy), then plain matmuls
    k = k_cache[table].reshape(batch, tokens, heads_kv, dim).transpose(1, 2).to(acc)
    v = v_cache[table].reshape(batch, tokens, heads_kv, dim).transpose(1, 2).to(acc)
    qh = q.reshape(batch, heads_kv, rep, dim).to(acc)
    s = (qh @ k.transpose(-1, -2)) * scale  # [batch, heads_kv, rep, tokens]
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    s = s.reshape(batch, heads_kv, rep, splits, tokens // splits)
    lse = torch.logsumexp(s, dim=-1)  # [batch, heads_kv, rep, splits]
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf")).unsqueeze(-1))
    out = p.transpose(2, 3) @ v.reshape(batch, heads_kv, splits, tokens // splits, dim)
    # out: [batch, heads_kv, splits, rep, dim] -> [splits, batch, heads_q, dim]
    out = out.permute(2, 0, 1, 3, 4).reshape(splits, batch, heads_q, dim)
    return out, lse.permute(3, 0, 1, 2).reshape(splits, batch, heads_q)


def _length_groups(lens: list[int], floor: int = 512) -> list[list[int]]:
    """Batch indices in groups whose longest sequence is at most twice the others (or `floor` tokens).
    The torch path pads every sequence of a call to the longest: one long context in a batch of short
    ones would otherwise cost batch x the long one."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if groups and lens[groups[-1][0]] <= 2 * max(lens[i], floor):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, softmax_scale=None, num_splits=None,
                     backend="auto", check_values=True):
    """Flash-decoding over a paged KV cache.

    q: [batch, heads_q, dim]; k_cache, v_cache: [num_blocks, block_size, heads_kv, dim];
    block_tables: int32 [batch, max_blocks]; seq_lens: int32 [batch]. Returns [batch, heads_q, dim].
    num_splits: KV splits per sequence (None: fill the GPU). backend: "auto" | "torch" | "triton".
    check_values: check seq_lens and the used page ids (costs a device sync on GPU; a serving loop
    that builds its own tables may turn it off). Shapes, dtypes and devices are always checked.
    On GPU the splits are planned from max_blocks (no sync); on CPU from the longest sequence.
    """
    _validate(q, k_cache, v_cache, block_tables, seq_lens, num_splits, backend)
    if check_values and q.shape[0]:
        _validate_values(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1])
    if q.is_cuda:
        max_len = block_tables.shape[1] * k_cache.shape[1]
    else:
        max_len = int(seq_lens.max()) if q.shape[0] else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    block_size, heads_kv = k_cache.shape[1], k_cache.shape[2]
    splits = _pick_splits(q, max_len, block_size, heads_kv, num_splits)
    pages_per_split = max(1, math.ceil(math.ceil(max_len / block_size) / splits))
    if backend == "auto":
        backend = "triton" if q.is_cuda and q.dtype != torch.float64 and triton_available() else "torch"
    if backend == "torch" and not q.is_cuda and q.shape[0] > 1:
        groups = _length_groups(seq_lens.tolist())
        if len(groups) > 1:  # each group padded to its own longest sequence, not the batch's
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            out = torch.empty(q.shape, dtype=acc, device=q.device)
            for idx in groups:
                sel = torch.tensor(idx, device=q.device)
                out[sel] = decode_attention(q[sel], k_cache, v_cache, block_tables[sel], seq_lens[sel],
                                            softmax_scale=scale, num_splits=num_splits, backend="torch",
                                            check_values=False).to(acc)
            return out.to(q.dtype)
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the 'triton' package (extra: triton)")
        if q.dtype == torch.float64:
            raise ValueError("backend='triton' supports float16/bfloat16/float32, not float64")
        from .triton_decode import triton_decode_partials
        outs, lses = triton_decode_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, splits,
                                            pages_per_split)
    else:
        outs, lses = _torch_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, splits, pages_per_split)
    out, _ = merge_attention_splits(outs, lses, dim=0)
    return out.to(q.dtype)
