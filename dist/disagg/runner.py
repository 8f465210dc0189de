"""The model's forward pass over a paged KV cache: prefill chunks and batched one-token decode steps.

    runner = Runner(model, cache)
    logits = runner.prefill(tokens, start, blocks)         # chunk at positions start.. -> last logits [vocab]
    logits = runner.decode(tokens, positions, tables)      # [batch] -> [batch, vocab]

It walks the Llama's own modules (dist.models.llama) layer by layer; the only difference from
`model(input_ids)` is where keys and values come from: each layer writes the new positions' k, v into
the cache pages and attends over the pages. A prefill chunk attends with `dist.kernels.attention`
(causal, offset by the chunk start); a decode step with `dist.kernels.decode_attention` over the block
tables of the whole running batch. A prefill group (serve.prefill_group > 1) runs a whole prompt
sharded over its ranks with `dist.ringattn.ring_attention` and gathers the KV on its leader.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dist.kernels import attention, decode_attention
from dist.models.llama import apply_rope, rope_cos_sin, rope_inv_freq

from .kvcache import PagedKVCache


class Runner:
    def __init__(self, model, cache: PagedKVCache, ring_group=None, ring_ranks: tuple[int, ...] = ()):
        self.model, self.cache = model, cache
        self.ring_group, self.ring_ranks = ring_group, ring_ranks  # a prefill group: its leader runs this
        self.last_command = 0.0
        cfg = model.config
        self.hq, self.hkv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = self.d ** -0.5
        self.inv_freq = rope_inv_freq(cfg, device=cache.k.device)

    def _qkv(self, layer, x, cos, sin):
        """x [batch, seq, dim] -> q [batch, seq, heads_q, d], k, v [batch, seq, heads_kv, d] (RoPE applied)."""
        a = layer.self_attn
        b, s, _ = x.shape
        q = a.q_proj(x).view(b, s, self.hq, self.d)
        k = a.k_proj(x).view(b, s, self.hkv, self.d)
        v = a.v_proj(x).view(b, s, self.hkv, self.d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _finish_layer(self, layer, h, attn_out):
        """Residual + MLP after attention; attn_out [batch, seq, heads_q, d]."""
        b, s = attn_out.shape[:2]
        h = h + layer.self_attn.o_proj(attn_out.reshape(b, s, self.hq * self.d))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def prefill(self, tokens: list[int], start: int, blocks: list[int], on_layer=None) -> torch.Tensor:
        """Run positions start..start+len(tokens)-1 of one sequence whose positions 0..start-1 are already in
        `blocks`; writes their KV and returns the logits of the last position [vocab] (float32).
        on_layer(i) is called once layer i's KV is in the pages (the KV transfer starts sending it)."""
        if self.ring_group is not None:
            assert start == 0, "a prefill group runs whole prompts"
            self._command(len(tokens))
            dist.broadcast(torch.tensor(tokens, device=self.cache.k.device), self.ring_ranks[0],
                           group=self.ring_group)
            return self.prefill_ring(tokens, blocks, on_layer)
        return self._prefill(tokens, start, blocks, on_layer)

    @torch.inference_mode()
    def _prefill(self, tokens: list[int], start: int, blocks: list[int], on_layer=None) -> torch.Tensor:
        m, dev = self.model, self.cache.k.device
        end = start + len(tokens)
        ids = torch.tensor([tokens], device=dev)
        h = m.embed_tokens(ids)  # [1, seq, dim]
        cos, sin = rope_cos_sin(torch.arange(start, end, device=dev)[None], self.inv_freq, h.dtype)
        new = self.cache.slots(blocks, start, end)
        seen = self.cache.slots(blocks, 0, end)
        for i, layer in enumerate(m.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.cache.write(i, new, k[0], v[0])
            if on_layer:
                on_layer(i)
            k_all, v_all = self.cache.gather(i, seen)  # [end, heads_kv, d]
            out = attention(q, k_all[None], v_all[None], causal=True, causal_offset=start, softmax_scale=self.scale)
            h = self._finish_layer(layer, h, out)
        return m.lm_head(m.norm(h[:, -1]))[0].float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One new token per sequence: tokens[i] at positions[i] (its pages in tables[i], positions before it
        cached). Writes the new KV; returns logits [batch, vocab] (float32)."""
        m, dev = self.model, self.cache.k.device
        bs = self.cache.layout.block_size
        ids = torch.tensor(tokens, device=dev)[:, None]  # [batch, 1]
        pos = torch.tensor(positions, device=dev)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        slots = table.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs  # [batch]
        seq_lens = (pos + 1).to(torch.int32)
        h = m.embed_tokens(ids)  # [batch, 1, dim]
        cos, sin = rope_cos_sin(pos[:, None], self.inv_freq, h.dtype)
        for i, layer in enumerate(m.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.cache.write(i, slots, k[:, 0], v[:, 0])
            out = decode_attention(q[:, 0], self.cache.k[i], self.cache.v[i], table, seq_lens,
                                   softmax_scale=self.scale, check_values=False)  # [batch, heads_q, d]
            h = self._finish_layer(layer, h, out[:, None])
        return m.lm_head(m.norm(h[:, 0])).float()

    # -- a prefill group: one prompt across several ranks with ring attention ---------------------------------

    def _command(self, n: int) -> None:
        """Leader -> followers: n > 0 a prompt of n tokens follows, 0 a heartbeat, -1 stop."""
        dist.broadcast(torch.tensor([n], device=self.cache.k.device), self.ring_ranks[0], group=self.ring_group)
        self.last_command = time.monotonic()

    def heartbeat(self) -> None:
        """Called when idle: followers blocked in broadcast stay inside their collective timeout."""
        if self.ring_group is not None and time.monotonic() - self.last_command > 1.0:
            self._command(0)

    def close(self) -> None:
        if self.ring_group is not None:
            self._command(-1)
            self.ring_group = None

    def follow(self) -> None:
        """A follower's loop: run the leader's prompts with it until told to stop."""
        dev = self.cache.k.device
        while True:
            n = torch.empty(1, dtype=torch.int64, device=dev)
            dist.broadcast(n, self.ring_ranks[0], group=self.ring_group)
            if n.item() < 0:
                return
            if n.item() > 0:
                tokens = torch.empty(int(n.item()), dtype=torch.int64, device=dev)
                dist.broadcast(tokens, self.ring_ranks[0], group=self.ring_group)
                self.prefill_ring(tokens.tolist(), None)

    @torch.no_grad()  # not inference_mode: ring attention's transport may copy these tensors on its own thread
    def prefill_ring(self, tokens: list[int], blocks: list[int] | None, on_layer=None) -> torch.Tensor:
        """The whole prompt, zigzag-sharded over the group (padded at the end to a multiple of 2 x group size,
        which causal attention never lets the real tokens see); every rank of the group calls it. The leader
        (blocks given) writes the gathered KV into its pages; returns the last real position's logits."""
        from dist.ringattn import ring_attention, shard, unshard

        m, dev, g = self.model, self.cache.k.device, self.ring_group
        world, rank = len(self.ring_ranks), dist.get_rank(g)
        n = len(tokens)
        padded = -(-n // (2 * world)) * 2 * world
        ids = torch.tensor(tokens + [0] * (padded - n), device=dev)[None]
        pos = torch.arange(padded, device=dev)[None]
        h = m.embed_tokens(shard(ids, 1, rank, world, "zigzag"))  # [1, padded / world, dim]
        cos, sin = rope_cos_sin(shard(pos, 1, rank, world, "zigzag"), self.inv_freq, h.dtype)
        slots = self.cache.slots(blocks, 0, n) if blocks is not None else None
        for i, layer in enumerate(m.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            out = ring_attention(q, k, v, causal=True, group=g, strategy="tokenring", layout="zigzag",
                                 softmax_scale=self.scale)
            k_all, v_all = unshard(k, 1, g, "zigzag"), unshard(v, 1, g, "zigzag")  # [1, padded, heads_kv, d]
            if slots is not None:
                self.cache.write(i, slots, k_all[0, :n], v_all[0, :n])
                if on_layer:
                    on_layer(i)
            h = self._finish_layer(layer, h, out)
        last = unshard(m.norm(h), 1, g, "zigzag")[0, n - 1]
        return m.lm_head(last).float()
