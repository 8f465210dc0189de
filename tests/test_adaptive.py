"""sp.adaptive: the planner scatters each batch over SP groups of different sizes, each group runs its
sequences packed; the whole batch's loss and gradients equal one rank's (fp32), every rank runs the
same plan, and the config refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch

from dist.config import ConfigError, load_config
from tests.multirank import run_ranks
from tests.test_engine import assert_same_training

# short sequences of very different lengths, and a capacity that makes the planner mix group sizes
SMALL = ["data.seq_len_min=24", "data.seq_len_max=256", "data.tokens_per_step=640", "train.warmup_steps=1",
         "train.steps=2", "log.level=warning"]


def _train(rank, world, overrides):
    from dist.seqpar import adaptive
    from dist.train import train

    plans = []
    original = adaptive.AdaptiveRunner.plan

    def recording(self, *args):
        plan = original(self, *args)
        plans.append(plan)
        return plan

    adaptive.AdaptiveRunner.plan = recording
    try:
        out = train(load_config(None, overrides))
    finally:
        adaptive.AdaptiveRunner.plan = original
    params = {k: v.detach().clone() for k, v in out["model"].state_dict().items()}
    return params, out["loss"], plans


@pytest.mark.timeout(300)
def test_adaptive_four_ranks_equal_one_rank(tmp_path):
    base = SMALL + [f"log.dir={tmp_path}/log"]
    one = run_ranks(_train, 1, base, init_group=False, timeout_s=150)[0]
    four = run_ranks(_train, 4, base + ["sp.adaptive=true", "sp.max_tokens_per_rank=96", "sp.plan_time_limit_s=0.5"],
                     init_group=False, timeout_s=240)
    from dist.models import build_model

    init = {k: v.detach().clone() for k, v in build_model("tiny", seed=0).state_dict().items()}
    for k in one[0]:
        assert_same_training(four[0][0][k], one[0][k], init[k])
        assert torch.equal(four[0][0][k], four[3][0][k])  # ranks stay identical
    assert abs(four[0][1] - one[1]) < 1e-5
    plans = [p for _, _, p in four]
    assert plans[0] == plans[1] == plans[2] == plans[3]  # every rank ran rank 0's plan
    sizes = {len(ranks) for step in plans[0] for micro in step for ranks, _ in micro}
    assert len(sizes) > 1, plans[0]  # groups of different sizes were used


def test_adaptive_config_errors():
    with pytest.raises(ConfigError, match="sp.adaptive"):
        load_config(None, ["sp.adaptive=true", "sp.degree=2"])
    with pytest.raises(ConfigError, match="sp.adaptive"):
        load_config(None, ["sp.adaptive=true", "train.engine=fsdp"])
    from dist.config import check_world

    with pytest.raises(ConfigError, match="power-of-two"):
        check_world(load_config(None, ["sp.adaptive=true"]), 3)
