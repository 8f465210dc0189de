"""Adaptive sequence parallelism in training (`sp.adaptive = true`): each step's batch is scattered over
SP groups of different sizes by the planner, and each group runs its sequences packed in one pass.

    runner = AdaptiveRunner(model, rt, cfg)        # builds every candidate group once
    sums = runner.step(engine, batch, step, upcoming)  # (loss sum, recall-loss sum, recall count) of this rank

Per step: rank 0 plans (`plan_scatter`; the next step's plan is made in the background while this step
runs, from the upcoming batch the training loop has already built) and broadcasts the plan, so every rank runs the
same one. In each micro-batch a rank in a group packs the group's sequences (each padded at its end to
what the layout needs, labels of the padding ignored), takes its shard of every sequence
(`shard(..., cu_seqlens=...)`) and runs forward and backward through SP attention over the group
(plain varlen attention for a group of one); a rank in no group of a micro-batch waits for the next.
The loss is sum(token losses) / the batch's target count on every rank, so the gradients the engine
sums over all ranks equal the single-device gradients of the whole batch.
"""

from __future__ import annotations

import concurrent.futures
import logging

import torch
import torch.distributed as dist

from dist import comm
from dist.data import IGNORE, pack
from dist.models import token_losses
from dist.ringattn import shard

from .cost import CostModel
from .planner import candidate_groups, check_world, plan_scatter
from .wrap import ring_attn_fn

log = logging.getLogger(__name__)


def capacity(cfg, world_size: int) -> int:
    """Tokens one rank holds at once: sp.max_tokens_per_rank, else the memory estimate on a GPU (or
    runtime.device_memory_gb), else the whole global batch (host memory: no split needed)."""
    if cfg.sp.max_tokens_per_rank:
        return cfg.sp.max_tokens_per_rank
    from dist import memory

    if torch.cuda.is_available() or cfg.runtime.device_memory_gb:
        cap = memory.max_tokens_per_rank(cfg, world_size, cfg.runtime.device_memory_gb or None)
        if cap <= 0:
            raise ValueError("sp.adaptive: the model state alone does not fit the device by the memory estimate "
                             "(python -m dist.launch train --estimate-memory shows it)")
        return cap
    return cfg.data.tokens_per_step


class AdaptiveRunner:
    def __init__(self, model, rt, cfg):
        check_world(rt.world_size)
        self.model, self.rt, self.cfg = model, rt, cfg
        self.groups = {}  # ranks -> process group, for this rank's candidate groups of two or more
        for ranks in candidate_groups(rt.world_size):  # every rank creates every group, in one order
            if len(ranks) > 1:
                group, _ = comm.new_group_pair(list(ranks), timeout=rt.timeout)
                if group is not None:
                    self.groups[ranks] = group
        self.cap = capacity(cfg, rt.world_size)
        self.cost = CostModel.from_config(cfg)  # sp.cost_model, else the preset's flops on H100s
        self.pool = concurrent.futures.ThreadPoolExecutor(1) if rt.is_main else None
        self.next = None  # (step, future of its plan), rank 0 only

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    # -- planning ----------------------------------------------------------------------------------------

    def _plan(self, lens: list[int]):
        plan = plan_scatter(lens, self.rt.world_size, max_tokens_per_rank=self.cap, cost_model=self.cost,
                            time_limit_s=self.cfg.sp.plan_time_limit_s)
        return [[(g.ranks, list(g.seq_ids)) for g in mb] for mb in plan.microbatches], plan

    def plan(self, step: int, batch, upcoming=None) -> list:
        """The plan of `step` (its batch) on every rank: micro-batches of (ranks, seq_ids). Rank 0 also
        starts planning step + 1 (the batch `upcoming`, None after the last step) in the background."""
        obj = [None]
        if self.rt.is_main:
            if self.next is not None and self.next[0] == step:
                groups, plan = self.next[1].result()
            else:
                groups, plan = self._plan([len(s) for s in batch.seqs])
            log.debug("step %d: plan %s, %d micro-batches, predicted %.3g s, planned in %.3f s", step + 1,
                      plan.solver, len(groups), plan.predicted_step_s, plan.solve_s)
            obj[0] = groups
            if upcoming is not None:
                self.next = (step + 1, self.pool.submit(self._plan, [len(s) for s in upcoming.seqs]))
        if self.rt.world_size > 1:
            dist.broadcast_object_list(obj, src=0)
        return obj[0]

    # -- running -----------------------------------------------------------------------------------------

    def step(self, engine, batch, step: int, upcoming=None) -> torch.Tensor:
        """Forward and backward of every micro-batch this rank is in; returns float64 [3] sums.
        upcoming: the next step's batch (planned in the background), None after the last step."""
        sums = torch.zeros(3, dtype=torch.float64)
        n_global = batch.num_targets
        for micro in self.plan(step, batch, upcoming):
            for ranks, seq_ids in micro:
                if self.rt.rank in ranks:
                    sums += self._run_group(engine, batch, ranks, seq_ids, n_global)
        return sums

    def _run_group(self, engine, batch, ranks, seq_ids, n_global) -> torch.Tensor:
        d, layout = len(ranks), self.cfg.sp.layout
        multiple = 1 if d == 1 else (2 * d if layout == "zigzag" else d)
        inputs, labels, positions, recall, cu = pack([batch.seqs[i] for i in seq_ids],
                                                     [batch.recall_masks[i] for i in seq_ids], multiple)
        if d > 1:
            r = ranks.index(self.rt.rank)
            inputs, labels, positions, recall = (shard(x, 0, r, d, layout, cu_seqlens=cu)
                                                 for x in (inputs, labels, positions, recall))
            self.model.set_attention(ring_attn_fn(self.groups[ranks], self.cfg.sp.strategy, layout))
        else:
            self.model.set_attention(None)
        dev = self.rt.device
        logits = engine.forward(input_ids=inputs[None].to(dev), position_ids=positions[None].to(dev),
                                cu_seqlens=cu.to(dev))
        losses = token_losses(logits[0], labels.to(dev), IGNORE)
        engine.backward(losses.sum() / n_global, last=False)
        recall = recall.to(dev)
        return torch.tensor([losses.sum().item(), losses[recall].sum().item(), int(recall.sum())],
                            dtype=torch.float64)
