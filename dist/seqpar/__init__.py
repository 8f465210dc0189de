"""Sequence parallelism: model wrapping (ring attention or Ulysses) and the scattering planner.

    from dist.seqpar import wrap_model, plan_scatter, CostModel
    model = wrap_model(model, group=sp_group, strategy="tokenring", layout="zigzag")   # or "ulysses"
    plan = plan_scatter(seq_lens, world_size, max_tokens_per_rank=32768)              # groups per step
    plan = plan_on_rank(seq_lens, world_size, max_tokens_per_rank=32768)              # rank 0's, everywhere
"""

from .ulysses import ulysses_attention
from dist.plan import SP_STRATEGIES

from .cost import CostModel
from .planner import Group, Plan, candidate_groups, plan_on_rank, plan_scatter
from .wrap import HF_ATTENTION_NAME, ring_attn_fn, sp_attention, wrap_model

__all__ = ["wrap_model", "ring_attn_fn", "sp_attention", "ulysses_attention", "SP_STRATEGIES", "HF_ATTENTION_NAME",
           "plan_scatter", "plan_on_rank", "CostModel", "Plan", "Group", "candidate_groups"]
