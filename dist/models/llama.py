"""A Llama-architecture decoder in one file (gpt-fast style).

    cfg = PRESETS["tiny"]
    model = Llama(cfg, seed=0)                      # deterministic init
    logits = model(input_ids, position_ids)         # [batch, seq] -> [batch, seq, vocab]
    model.set_attention(fn)                         # every layer's attention goes through fn

RMSNorm, rotary position embeddings (RoPE) computed from explicit position ids,
grouped-query attention (GQA) and a SwiGLU MLP. Position ids are explicit so a
rank that holds a shard of a sequence (sequence parallelism) gives RoPE the
shard's true positions; the attention itself is one pluggable function

    attn_fn(q, k, v, *, causal=True, softmax_scale=None) -> out
    q: [batch, seq, heads_q, head_dim]; k, v: [batch, seq, heads_kv, head_dim] (GQA not expanded)
    out: [batch, seq, heads_q, head_dim]

defaulting to `dist.kernels.attention` (single device). Ring attention is
another such function.

Parameter names equal Hugging Face's LlamaForCausalLM names without the
"model." prefix (see `dist.models.hf.hf_name`): embed_tokens.weight,
layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.mlp.{gate,up,down}_proj.weight,
layers.{i}.{input,post_attention}_layernorm.weight, norm.weight, lm_head.weight.
RoPE uses HF's "rotate_half" convention (the two halves of each head's
dimensions form the rotated pairs), so HF q/k weights load without permutation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class ModelConfig:
    """Shape of a Llama-architecture model.

    rope_scaling: None, or Llama-3.1's {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (the Hugging Face keys).
    head_dim: None means dim // n_heads.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    rope_scaling: dict | None = None
    head_dim: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelConfig.dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be a positive even integer, got {self.head_dim!r}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict) or rs.get("rope_type") != "llama3":
                raise ValueError(f"ModelConfig.rope_scaling: only None or rope_type 'llama3' is supported, got {rs!r}")
            missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if k not in rs]
            if missing:
                raise ValueError(f"ModelConfig.rope_scaling is missing {missing}")
            if not rs["high_freq_factor"] > rs["low_freq_factor"]:
                raise ValueError("ModelConfig.rope_scaling: high_freq_factor must exceed low_freq_factor")

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        if "dim" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", None)
        changes.setdefault("rope_scaling", copy.deepcopy(self.rope_scaling))
        return dataclasses.replace(self, **changes)


CHECKPOINTING_MODES = ("none", "full", "selective")

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # Runs in seconds on a CPU; vocab 512 holds the byte tokenizer (259 ids).
    "tiny": ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
                        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=8192),
    # Real shapes (meta-llama/Meta-Llama-3-8B, -70B and the 3.1 versions with long-context RoPE).
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                             rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192),
    "llama3-70b": ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                              rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192),
    "llama3.1-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                               rope_theta=500000.0, norm_eps=1e-5, max_seq_len=131072,
                               rope_scaling=dict(_LLAMA31_ROPE)),
    "llama3.1-70b": ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                                rope_theta=500000.0, norm_eps=1e-5, max_seq_len=131072,
                                rope_scaling=dict(_LLAMA31_ROPE)),
}


# ---------------------------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32 (Llama-3.1 "llama3" scaling applied when configured)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (> old_len / low) are slowed by `factor`, short ones (< old_len / high) kept, between: blended
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """position_ids [batch, seq] -> (cos, sin), each [batch, seq, 1, head_dim] in `dtype` (computed in float32)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [batch, seq, head_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, head_dim]; rotates the pairs (i, i + head_dim/2) ("rotate_half", as HF)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------------------------
# Layers


def default_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None):
    """`dist.kernels.attention`, looked up at call time (so a replaced kernel module is picked up);
    cu_seqlens: packed sequences (int32 [n + 1]), attention stays within each."""
    from dist.kernels import attention

    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens,
                     cu_seqlens_k=cu_seqlens)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim]: normalised in float32, scaled by weight in x's dtype."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # A plain attribute, not a submodule: swapping attention never changes parameters or state_dict.
        object.__setattr__(self, "attn_fn", default_attention)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """x [batch, seq, dim]; cos, sin [batch, seq, 1, head_dim] -> [batch, seq, dim]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        out = self.attn_fn(q, k, v, causal=True, softmax_scale=self.head_dim ** -0.5, **packed)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.recompute_mlp = False  # "selective" checkpointing: keep attention's tensors, recompute the MLP half

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens)
        if self.recompute_mlp and torch.is_grad_enabled():
            return h + torch.utils.checkpoint.checkpoint(self.mlp_half, h, use_reentrant=False)
        return h + self.mlp_half(h)

    def mlp_half(self, h: torch.Tensor) -> torch.Tensor:
        """The post-attention norm and the SwiGLU MLP (what "selective" checkpointing recomputes)."""
        return self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------------------------------------------------------
# Model


class Llama(nn.Module):
    """Llama decoder: model(input_ids [batch, seq], position_ids [batch, seq] | None) -> logits [batch, seq, vocab].

    Built on the meta device (`with torch.device("meta"): Llama(cfg)`) it allocates nothing; after
    `to_empty(device=...)` call `init_weights(seed)` (which also re-ties tied embeddings).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.activation_checkpointing = "none"
        self.init_weights(seed)

    # -- setup ---------------------------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """With cfg.tie_embeddings, make lm_head share embed_tokens' weight (again, e.g. after to_empty)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from `seed`: norms 1, weights N(0, 0.02), residual projections (o_proj,
        down_proj) N(0, 0.02 / sqrt(2 * n_layers)). Same seed, device and dtype -> same weights.
        Does nothing on the meta device."""
        self.tie_weights()
        params = list(self.named_parameters())  # tied weights appear once, as embed_tokens.weight
        if not params or params[0][1].device.type == "meta":
            return
        gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in params:
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, residual_std, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)

    def set_attention(self, fn: Callable | None) -> None:
        """Route every layer's attention through fn(q, k, v, *, causal, softmax_scale) (None: the default)."""
        if fn is None:
            fn = default_attention
        if not callable(fn):
            raise ValueError(f"set_attention: fn must be callable, got {type(fn).__name__}")
        for layer in self.layers:
            object.__setattr__(layer.self_attn, "attn_fn", fn)

    def set_activation_checkpointing(self, mode: str | bool = "full") -> None:
        """What backward recomputes instead of keeping from forward (long sequences run out of memory on
        saved activations first):

        - "none": keep everything (fastest).
        - "full": keep only each layer's input; backward reruns the whole layer, attention included (with
          sequence parallelism that repeats the ring pass of every layer).
        - "selective": keep the attention half (its q, k, v, output, log-sum-exp), recompute the
          post-attention norm and the MLP, whose SwiGLU intermediates ([seq, ffn_dim] x 4) are the largest
          saved tensors of a layer; no communication is repeated.

        True / False mean "full" / "none". Recomputation reruns the same kernels on the same inputs, so
        gradients are bit-identical to "none" on deterministic kernels.
        """
        if isinstance(mode, bool):
            mode = "full" if mode else "none"
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation checkpointing must be one of {list(CHECKPOINTING_MODES)}, got {mode!r}")
        self.activation_checkpointing = mode
        for layer in self.layers:
            layer.recompute_mlp = mode == "selective"

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [batch, seq] (int); position_ids [batch, seq] or [1, seq] (default 0..seq-1)
        -> logits [batch, seq, vocab] in the parameters' dtype. cu_seqlens (int32 [n + 1], batch 1):
        the input packs n sequences (position ids restart in each); attention stays within each."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None, :]
        elif position_ids.dim() != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
            raise ValueError(f"position_ids must be [batch, seq] = [{b}, {s}] (or [1, {s}]), "
                             f"got shape {tuple(position_ids.shape)}")
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(self.config, device=h.device), h.dtype)
        for layer in self.layers:
            if self.activation_checkpointing == "full" and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, cu_seqlens, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cu_seqlens)
        return self.lm_head(self.norm(h))

    # -- accounting ----------------------------------------------------------------------------------------------

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once); optionally without the input embedding."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs (forward + backward) per token at sequence length `seq_len`, for MFU:
        6 * (weights used in matmuls, lm_head included even when tied) + attention scores and values,
        12 * n_layers * n_heads * head_dim * seq_len, halved when causal (only the unmasked half is needed)."""
        cfg = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
        return 6 * matmul_params + (attn / 2 if causal else attn)


def build_model(preset_or_config: str | ModelConfig, seed: int = 0, *, device=None,
                dtype: torch.dtype | None = None) -> Llama:
    """A Llama from a preset name (see PRESETS) or a ModelConfig, initialised from `seed`.

    device="meta" allocates nothing (for counting or later `to_empty` + `init_weights`)."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown model preset {preset_or_config!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_config].replace()  # a copy: callers may mutate theirs
    elif isinstance(preset_or_config, ModelConfig):
        cfg = preset_or_config
    else:
        raise ValueError(f"preset_or_config must be a preset name or a ModelConfig, got {preset_or_config!r}")
    with torch.device(device if device is not None else "cpu"):
        if dtype is None:
            return Llama(cfg, seed=seed)
        model = Llama(cfg, seed=seed).to(dtype)
    model.init_weights(seed)  # in the target dtype, so it does not depend on a float32 detour
    return model
