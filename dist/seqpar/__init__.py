"""Sequence parallelism: model wrapping (ring attention). The planner and Ulysses join here later.

    from dist.seqpar import wrap_model
    model = wrap_model(model, group=sp_group, strategy="tokenring", layout="zigzag")
"""

from .wrap import HF_ATTENTION_NAME, ring_attn_fn, wrap_model

__all__ = ["wrap_model", "ring_attn_fn", "HF_ATTENTION_NAME"]
