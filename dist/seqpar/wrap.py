"""wrap_model: make a model's attention sequence-parallel (ring attention or Ulysses over a process group).

Each rank then calls the model with its shard of the sequence, in `layout`, with the true
position ids of its tokens (so RoPE is right):

    sp_model = wrap_model(model, group=sp_group, strategy="tokenring", layout="zigzag")
    logits = sp_model(shard(ids, 1, rank, world, "zigzag"), shard(positions, 1, rank, world, "zigzag"))
    # unshard(logits, 1, sp_group, "zigzag") == model(ids, positions)

Works with dist.models.Llama (model.set_attention) and with Hugging Face models that use the
transformers attention interface (LlamaForCausalLM, ...), through AttentionInterface.register
and set_attn_implementation. The model object is modified in place and returned. Parameter
gradients are per-rank partial sums: the training loop's all-reduce over the group (or over
dp x sp) completes them.
"""

from __future__ import annotations

import functools
import logging

import torch

from dist.plan import LAYOUTS, SP_STRATEGIES, STRATEGY_CHOICES
from dist.ringattn import ring_attention

from .ulysses import ulysses_attention

log = logging.getLogger(__name__)

HF_ATTENTION_NAME = "dist_ring"


def _check(strategy: str, layout: str) -> None:
    if strategy not in STRATEGY_CHOICES:
        raise ValueError(f"strategy must be one of {STRATEGY_CHOICES}, got {strategy!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def sp_attention(q, k, v, *, causal=True, softmax_scale=None, group=None, strategy="tokenring", layout="zigzag",
                 cu_seqlens=None):
    """Sequence-parallel attention of this rank's shard: ring_attention, or ulysses_attention for
    strategy "ulysses" (same arguments and layouts). "auto" picks from the dist.sim model among the
    strategies (dist.sim.choose_strategy, the one "auto" policy)."""
    if strategy == "auto":
        strategy = _auto(q, k, causal, group, layout)
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, layout=layout,
                                 cu_seqlens=cu_seqlens)
    return ring_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                          strategy=strategy, layout=layout, cu_seqlens=cu_seqlens)


def _auto(q, k, causal, group, layout) -> str:
    """The strategy the dist.sim model prefers among all of SP_STRATEGIES (dist.sim.choose_strategy
    leaves Ulysses out where the group size does not divide the heads). Malformed inputs: "auto",
    so ring_attention's checks name the problem on every rank."""
    import torch.distributed as dist

    from dist import comm
    from dist.sim import choose_strategy

    world = comm.group_size(group) if dist.is_initialized() else 1
    if world == 1 or q.dim() != 4 or k.dim() != 4:
        return "auto"
    return choose_strategy(q.shape, k.shape, comm.group_ranks(group), causal=causal, layout=layout,
                           itemsize=q.element_size(), device_type=q.device.type, candidates=SP_STRATEGIES)


def ring_attn_fn(group=None, strategy: str = "tokenring", layout: str = "zigzag"):
    """The pluggable attention function fn(q, k, v, *, causal, softmax_scale) backed by sp_attention."""
    _check(strategy, layout)
    return functools.partial(sp_attention, group=group, strategy=strategy, layout=layout)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [b, hq, s, d], key/value [b, hkv, s, d] -> ([b, s, hq, d], None)."""
    cfg = getattr(module, "_dist_seqpar", None)
    if cfg is None:
        raise ValueError(f"attn_implementation {HF_ATTENTION_NAME!r} is set but the module was not wrapped "
                         "with dist.seqpar.wrap_model")
    if dropout:
        raise ValueError("wrap_model: attention dropout is not supported with ring attention (set it to 0)")
    out = sp_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                       causal=getattr(module, "is_causal", True), softmax_scale=scaling, **cfg)
    return out, None


def _hf_mask(*args, attention_mask=None, **kwargs):
    """Mask function for our attention implementation: none is built; the ring knows the causal layout."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("wrap_model: padding attention masks are not supported with sequence parallelism; "
                         "pack or pad sequences to the same length and pass attention_mask=None")
    return None


def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(HF_ATTENTION_NAME, _hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, _hf_mask)


def wrap_model(model: torch.nn.Module, group=None, strategy: str = "tokenring", layout: str = "zigzag"):
    """Swap the attention of `model` for sequence-parallel attention over `group` (in place; returns it).

    model: dist.models.Llama, or a transformers model using the attention interface.
    strategy: "tokenring" | "ring" | "allgather" | "auto" | "ulysses"; layout: "zigzag" | "contiguous".
    """
    _check(strategy, layout)
    if hasattr(model, "set_attention") and hasattr(model, "layers"):  # dist.models.Llama
        model.set_attention(ring_attn_fn(group, strategy, layout))
        return model
    if hasattr(model, "set_attn_implementation") and hasattr(model, "config"):  # transformers
        _register_hf()
        cfg = dict(group=group, strategy=strategy, layout=layout)
        n = 0
        for module in model.modules():
            if hasattr(module, "is_causal") and hasattr(module, "config") and hasattr(module, "head_dim"):
                object.__setattr__(module, "_dist_seqpar", cfg)
                n += 1
        if n == 0:
            raise ValueError(f"wrap_model: found no attention modules in {type(model).__name__}")
        model.set_attn_implementation(HF_ATTENTION_NAME)
        return model
    raise ValueError(f"wrap_model: model must be a dist.models.Llama or a transformers model with the attention "
                     f"interface, got {type(model).__name__}")
