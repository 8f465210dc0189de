"""train.activation_checkpointing: "full" and "selective" recompute in backward what "none" keeps, and
train exactly like "none" (deterministic mode: recomputation reruns the same kernels on the same inputs,
so losses and weights are bit-identical), with and without sequence parallelism, with both engines."""

import json

import pytest
import torch

from dist.config import ConfigError, deepspeed_available, load_config
from dist.models import build_model
from tests.multirank import run_ranks

SMALL = ["data.seq_len_min=40", "data.seq_len_max=160", "data.tokens_per_step=640", "train.warmup_steps=1",
         "train.steps=3", "train.deterministic=true", "log.level=warning"]


def _modes(rank, world_size, overrides, modes, log_dir):
    """Train once per checkpointing mode in this process group; (losses, weights) per mode."""
    from dist.train import train

    out = {}
    for mode in modes:
        cfg = load_config(None, SMALL + overrides + [f"train.activation_checkpointing={mode}",
                                                     f"log.dir={log_dir}/{mode}"])
        res = train(cfg)
        assert res["model"].activation_checkpointing == mode
        losses = [json.loads(x)["loss"] for x in open(f"{cfg.log.dir}/metrics.jsonl")] if rank == 0 else None
        out[mode] = losses, {k: v.detach().clone() for k, v in res["model"].state_dict().items()}
    return out


def _assert_same(runs, reference="none"):
    ref_losses, ref_params = runs[reference]
    assert len(ref_losses) == 3
    for mode, (losses, params) in runs.items():
        assert losses == ref_losses, mode
        for k, v in ref_params.items():
            assert torch.equal(params[k], v), (mode, k)


@pytest.mark.timeout(200)
def test_checkpointing_modes_train_like_none_one_rank(tmp_path):
    out = run_ranks(_modes, 1, [], ("none", "full", "selective"), str(tmp_path), timeout_s=150)
    _assert_same(out[0])


@pytest.mark.timeout(250)
@pytest.mark.parametrize("strategy", ["tokenring", "ulysses"])
def test_checkpointing_modes_train_like_none_sp2(tmp_path, strategy):
    """Full checkpointing reruns the ring / all-to-all of each layer in backward; selective does not."""
    out = run_ranks(_modes, 2, ["sp.degree=2", f"sp.strategy={strategy}"], ("none", "full", "selective"),
                    str(tmp_path), timeout_s=200)
    _assert_same(out[0])
    assert all(torch.equal(out[0]["full"][1][k], v) for k, v in out[1]["full"][1].items())


@pytest.mark.timeout(250)
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_checkpointing_with_deepspeed(tmp_path):
    out = run_ranks(_modes, 2, ["train.engine=deepspeed"], ("none", "full"), str(tmp_path), timeout_s=200)
    _assert_same(out[0])


def test_model_modes_recompute_what_they_say():
    """The backward graph of each mode: "full" keeps no SwiGLU intermediate and no attention output,
    "selective" keeps attention's output but no SwiGLU intermediate."""
    ffn = build_model("tiny").config.ffn_dim
    kept = {}
    for mode in ("none", "full", "selective"):
        model = build_model("tiny", seed=1)
        model.set_activation_checkpointing(mode)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            model(torch.randint(0, 512, (1, 16)))
        kept[mode] = shapes
    assert any(s[-1] == ffn for s in kept["none"])
    assert not any(s[-1] == ffn for s in kept["full"] + kept["selective"])
    attn_out = (1, 16, 4, 32)  # [batch, seq, heads, head_dim]: saved by the attention kernel
    assert attn_out in kept["none"] and attn_out in kept["selective"] and attn_out not in kept["full"]


def test_bad_checkpointing_mode_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"'train\.activation_checkpointing' must be one of"):
        load_config(None, ["train.activation_checkpointing=some"])
    with pytest.raises(ValueError, match="activation checkpointing must be one of"):
        build_model("tiny").set_activation_checkpointing("mlp")
