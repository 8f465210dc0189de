"""wrap_model: our Llama and a Hugging Face LlamaForCausalLM, sequence-parallel over 2-3 gloo ranks,
against the unwrapped model on the full sequence: unshard(logits) equal, summed parameter gradients equal."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.multirank import run_ranks


def _compare(model, call, rank, world, strategy, layout, vocab, seq):
    """Run the full model and the wrapped copy; return max |logit diff|, max relative grad diff, ring bytes."""
    import torch.distributed as dist

    from dist.ringattn import shard, unshard
    from dist.seqpar import wrap_model

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    pos = torch.arange(seq).expand(2, seq)
    weight = torch.randn(2, seq, vocab, generator=g)

    ref_model = copy.deepcopy(model)
    ref_logits = call(ref_model, ids, pos)
    (ref_logits * weight).sum().backward()

    from dist import comm

    sp_model = wrap_model(copy.deepcopy(model), group=None, strategy=strategy, layout=layout)
    comm.counters.reset()
    logits = call(sp_model, shard(ids, 1, rank, world, layout), shard(pos, 1, rank, world, layout))
    (logits * shard(weight, 1, rank, world, layout)).sum().backward()
    sent = comm.counters.total() - comm.counters.bytes["meta"]  # the ring really ran

    logit_err = (unshard(logits.detach(), 1, None, layout) - ref_logits.detach()).abs().max().item()
    grad_err = 0.0
    for (name, p), (_, p_ref) in zip(sp_model.named_parameters(), ref_model.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # the training loop's gradient all-reduce
        scale = p_ref.grad.abs().max().item() + 1e-6
        grad_err = max(grad_err, (grad - p_ref.grad).abs().max().item() / scale)
    return logit_err, grad_err, sent


def _body(rank, world, cases):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist.models import build_model

    torch.manual_seed(0)
    ours = build_model("tiny", seed=0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="sdpa"))
    seq = 8 * world
    out = {}
    for strategy, layout in cases:
        out[("ours", strategy, layout)] = _compare(
            ours, lambda m, i, p: m(i, p), rank, world, strategy, layout, ours.config.vocab_size, seq)
        out[("hf", strategy, layout)] = _compare(
            hf, lambda m, i, p: m(input_ids=i, position_ids=p).logits, rank, world, strategy, layout, 96, seq)
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,cases", [
    (2, [("tokenring", "zigzag"), ("ring", "contiguous"), ("ulysses", "zigzag")]),
    (3, [("tokenring", "zigzag"), ("allgather", "zigzag")]),
])
def test_wrapped_models_match_unwrapped(world, cases):
    per_rank = run_ranks(_body, world, cases, timeout_s=150)
    for rank, out in enumerate(per_rank):
        for case, (logit_err, grad_err, sent) in out.items():
            assert sent > 0, case
            assert logit_err < 1e-4, (rank, case, logit_err)
            assert grad_err < 1e-4, (rank, case, grad_err)


def test_wrap_model_rejects_bad_arguments():
    from dist.models import build_model
    from dist.seqpar import wrap_model

    model = build_model("tiny", seed=0)
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(model, strategy="ulysses-typo")
    with pytest.raises(ValueError, match="layout"):
        wrap_model(model, layout="spiral")
    with pytest.raises(ValueError, match="model"):
        wrap_model(torch.nn.Linear(2, 2))
