"""Sequence parallelism: model wrapping (ring attention or Ulysses). The planner joins here later.

    from dist.seqpar import wrap_model, ulysses_attention
    model = wrap_model(model, group=sp_group, strategy="tokenring", layout="zigzag")   # or "ulysses"
"""

from .ulysses import ulysses_attention
from dist.plan import SP_STRATEGIES

from .wrap import HF_ATTENTION_NAME, ring_attn_fn, sp_attention, wrap_model

__all__ = ["wrap_model", "ring_attn_fn", "sp_attention", "ulysses_attention", "SP_STRATEGIES", "HF_ATTENTION_NAME"]
