"""Sequence parallelism wired into training: sp.degree=2 follows the sp.degree=1 loss curve."""

import pytest
import torch

from dist.config import load_config
from tests.multirank import run_ranks

SMALL = ["data.seq_len_min=40", "data.seq_len_max=200", "data.tokens_per_step=800", "train.warmup_steps=1",
         "train.steps=3", "log.level=warning"]


def _train(rank, world_size, overrides):
    import json

    from dist.train import train

    cfg = load_config(None, overrides)
    out = train(cfg)
    losses = [json.loads(x)["loss"] for x in open(f"{cfg.log.dir}/metrics.jsonl")] if rank == 0 else None
    return losses, {k: v.detach().clone() for k, v in out["model"].state_dict().items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,layout,world", [("tokenring", "zigzag", 2), ("ring", "contiguous", 2),
                                                   ("ulysses", "zigzag", 2), ("tokenring", "zigzag", 4)])
def test_sp2_matches_sp1(tmp_path, strategy, layout, world):
    """world 2: one SP group of 2; world 4: two data-parallel groups of 2 (dp=2 x sp=2)."""
    base = SMALL + [f"sp.strategy={strategy}", f"sp.layout={layout}"]
    ref_losses, ref_params = run_ranks(_train, 1, base + [f"log.dir={tmp_path}/a"], init_group=False,
                                       timeout_s=150)[0]
    out = run_ranks(_train, world, base + ["sp.degree=2", f"log.dir={tmp_path}/b"], init_group=False,
                    timeout_s=200)
    losses, params = out[0]
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for k, v in ref_params.items():
        # Adam's m / sqrt(v) magnifies fp32 summation-order noise on near-zero gradients; the updates
        # themselves are ~1e-3..1e-2, so 1e-4 still catches any real difference
        torch.testing.assert_close(params[k], v, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(params[k], o[1][k]) for o in out[1:])  # every rank holds the same weights
