"""Paged KV cache: fixed-size pages of keys and values, handed out by a block manager.

    layout = KVLayout.of(model.config, block_size=16, dtype=torch.float32)
    cache = PagedKVCache(layout, num_blocks=1024, device="cpu")
    blocks = cache.manager.allocate(3)          # page ids, or None when too few are free (back-pressure)
    slots = cache.slots(blocks, start, end)     # flat slot ids of positions start..end-1
    cache.write(layer, slots, k, v)             # k, v [tokens, heads_kv, head_dim]
    k, v = cache.gather(layer, slots)           # back, [tokens, heads_kv, head_dim]
    cache.manager.free(blocks)                  # drops one reference per page

cache.k / cache.v: [layers, num_blocks, block_size, heads_kv, head_dim], so cache.k[layer] is the
k_cache that `dist.kernels.decode_attention` reads with a block table.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """What a KV page holds; prefill and decode workers must agree on every field."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32", "bfloat16", ...

    @classmethod
    def of(cls, model_config, block_size: int, dtype: torch.dtype) -> "KVLayout":
        return cls(model_config.n_layers, model_config.n_kv_heads, model_config.head_dim, block_size,
                   str(dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def check(self, other: "KVLayout", peer: str) -> None:
        """ValueError naming the first field that differs from `other` (the layout of `peer`)."""
        mine, theirs = asdict(self), asdict(other)
        for key in mine:
            if mine[key] != theirs[key]:
                raise ValueError(f"KV layout mismatch with {peer}: {key} is {mine[key]!r} here and "
                                 f"{theirs[key]!r} there; prefill and decode workers must serve the same model "
                                 f"with the same serve.block_size and model.dtype")


class BlockManager:
    """Page ids with reference counts. Thread-safe: the KV receiver allocates while the worker loop frees."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self.lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (reference count 1), or None when fewer than n are free: the caller waits."""
        with self.lock:
            if n > len(self.free_ids):
                return None
            ids = [self.free_ids.pop() for _ in range(n)]
            for i in ids:
                self.refs[i] = 1
            return ids

    def share(self, ids: list[int]) -> None:
        """One more reference to each page (a second sequence reading the same prefix)."""
        with self.lock:
            for i in ids:
                assert self.refs[i] > 0, f"page {i} is not allocated"
                self.refs[i] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference per page; a page with none left is free again."""
        with self.lock:
            for i in ids:
                assert self.refs[i] > 0, f"page {i} freed twice"
                self.refs[i] -= 1
                if self.refs[i] == 0:
                    self.free_ids.append(i)


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device="cpu"):
        self.layout = layout
        shape = (layout.n_layers, num_blocks, layout.block_size, layout.n_kv_heads, layout.head_dim)
        self.k = torch.zeros(shape, dtype=layout.torch_dtype, device=device)
        self.v = torch.zeros(shape, dtype=layout.torch_dtype, device=device)
        self.manager = BlockManager(num_blocks)

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot index (page * block_size + offset) of positions start..end-1, int64 [end - start]."""
        bs = self.layout.block_size
        pos = torch.arange(start, end, device=self.k.device)
        table = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        return table[pos // bs] * bs + pos % bs

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [tokens, heads_kv, head_dim] into the flat `slots`."""
        self.k[layer].view(-1, *k.shape[1:])[slots] = k
        self.v[layer].view(-1, *v.shape[1:])[slots] = v

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots`: two [tokens, heads_kv, head_dim] tensors."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:])[slots], v.view(-1, *v.shape[2:])[slots]

    def pack_layer(self, layer: int, blocks: list[int]) -> torch.Tensor:
        """The pages `blocks` of one layer, a new tensor [2, len(blocks), block_size, heads_kv, dim]."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        return torch.stack((self.k[layer, idx], self.v[layer, idx]))

    def unpack_layer(self, layer: int, blocks: list[int], packed: torch.Tensor) -> None:
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        self.k[layer, idx] = packed[0]
        self.v[layer, idx] = packed[1]

    def pack(self, blocks: list[int]) -> torch.Tensor:
        """The pages `blocks` of every layer as one tensor [layers, 2, len(blocks), block_size, heads_kv, dim]."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        return torch.stack((self.k[:, idx], self.v[:, idx]), dim=1)
