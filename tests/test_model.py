"""dist.models against transformers' LlamaForCausalLM, plus checkpoint format, presets, pluggable attention,
tokenizers and bad input."""

import json
import os
import shutil

import pytest
import torch

from dist.models import (PRESETS, ByteTokenizer, HFTokenizer, Llama, ModelConfig, build_model, load_hf,
                         load_tokenizer, save_hf)
from dist.models.llama import default_attention

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

# Two small HF configs: GQA + default RoPE, untied; and MHA + Llama-3.1 RoPE scaling + tied embeddings
# + a head_dim that is not hidden_size / heads.
HF_CONFIGS = {
    "gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                max_position_embeddings=512, tie_word_embeddings=False),
    "tied_llama3rope": dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=3, num_key_value_heads=3, head_dim=32, rope_theta=5000.0,
                            rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def _hf_model(kind, seed=0):
    """A random HF LlamaForCausalLM with O(1) logits (weights N(0, 0.1), norm weights around 1)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIGS[kind])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_dir(request, tmp_path_factory):
    """(HF model, directory it was saved to with save_pretrained)."""
    model = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def _inputs(vocab, batch=2, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    # each row a contiguous run of positions starting elsewhere (a shard of a long sequence)
    positions = torch.arange(seq)[None, :] + torch.tensor([[7], [300]])[:batch]
    return ids, positions


def _close(ours, ref, tol=1e-5):
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0.5, "reference logits too small for a meaningful comparison"
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, scale), f"max abs error {err:.3g} (logits up to {scale:.3g})"


@torch.no_grad()
def test_logits_match_transformers(hf_dir):
    hf, path = hf_dir
    ours = load_hf(path)
    assert isinstance(ours, Llama)
    ids, positions = _inputs(hf.config.vocab_size)
    _close(ours(ids, positions), hf(input_ids=ids, position_ids=positions).logits)
    _close(ours(input_ids=ids), hf(input_ids=ids).logits)
    # positions with gaps, as a zigzag shard has (chunks 0 and 7 of 8); an explicit all-ones mask keeps HF
    # from reading the gaps as packed sequences
    gapped = torch.cat([torch.arange(12), torch.arange(12) + 84])[None, :].repeat(2, 1)
    gapped[1] = torch.sort(torch.randperm(400, generator=torch.Generator().manual_seed(2))[:24]).values
    _close(ours(ids, gapped), hf(input_ids=ids, position_ids=gapped, attention_mask=torch.ones_like(ids)).logits)
    # RoPE is relative: a uniform shift changes nothing, gaps do
    _close(ours(ids, positions), ours(ids))
    assert (ours(ids, gapped) - ours(ids)).abs().max() > 1e-2
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight


@torch.no_grad()
def test_save_hf_loads_in_transformers(hf_dir, tmp_path):
    hf, path = hf_dir
    ours = load_hf(path)
    out = save_hf(ours, tmp_path / "saved")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ref_state, back_state = hf.state_dict(), back.state_dict()
    assert ref_state.keys() == back_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], back_state[k]), k
    ids, positions = _inputs(hf.config.vocab_size)
    _close(back(input_ids=ids, position_ids=positions).logits, hf(input_ids=ids, position_ids=positions).logits,
           tol=0)


@torch.no_grad()
def test_sharded_round_trip_and_replace(tmp_path):
    model = build_model(ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=1, ffn_dim=128),
                        seed=3)
    target = tmp_path / "ckpt"
    save_hf(model, target, max_shard_bytes=100_000)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and sorted(os.listdir(target)) == sorted(shards + ["config.json",
                                                                            "model.safetensors.index.json"])
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    for shard in shards:  # every shard within the limit unless it holds a single bigger tensor
        tensors = load_file(target / shard)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= 100_000
    loaded = load_hf(target)
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # a wrapper holding the model as .module (DDP, DeepSpeed) saves the model
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_hf(Wrapper(model), tmp_path / "wrapped")
    assert torch.equal(load_hf(tmp_path / "wrapped").norm.weight, model.norm.weight)
    shutil.rmtree(tmp_path / "wrapped")
    # transformers reads the sharded format too
    hf = transformers.LlamaForCausalLM.from_pretrained(target).eval()
    ids, positions = _inputs(300, seq=16)
    _close(model(ids, positions), hf(input_ids=ids, position_ids=positions).logits)

    # saving again replaces the directory in one step and leaves no temporary directories behind
    other = build_model(model.config, seed=4)
    save_hf(other, target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # (before the "bin" directory below)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert torch.equal(load_hf(target).lm_head.weight, other.lm_head.weight)

    # pytorch_model.bin (the older HF format) reads the same
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((target / "config.json").read_text())
    torch.save(load_file(target / "model.safetensors"), bin_dir / "pytorch_model.bin")
    assert torch.equal(load_hf(bin_dir).layers[2].mlp.down_proj.weight, other.layers[2].mlp.down_proj.weight)

    # bfloat16 load: values are the rounded float32 ones
    bf = load_hf(target, dtype="bfloat16")
    assert bf.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(bf.lm_head.weight, other.lm_head.weight.bfloat16())


def test_preset_parameter_counts_and_flops():
    # Published sizes of Meta-Llama-3-8B / -70B (safetensors total_size / 2 bytes in bfloat16).
    known = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
             "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496}
    for name, count in known.items():
        model = build_model(name, device="meta")
        assert model.num_params() == count, name
        assert next(model.parameters()).is_meta
    cfg = PRESETS["llama3-8b"]
    m = build_model("llama3-8b", device="meta")
    # 6 * (matmul weights: all but the input embedding and the 2 * 32 + 1 norms)
    # + causal attention 6 * layers * heads * head_dim * seq (12 * ... without the causal mask)
    matmul = 8_030_261_248 - cfg.vocab_size * cfg.dim - (2 * 32 + 1) * cfg.dim
    assert m.flops_per_token(8192) == 6 * matmul + 6 * 32 * 32 * 128 * 8192
    assert m.flops_per_token(8192, causal=False) == 6 * matmul + 12 * 32 * 32 * 128 * 8192
    tiny = build_model("tiny")
    assert tiny.config.vocab_size >= ByteTokenizer.vocab_size
    assert tiny.num_params() < 2_000_000


def test_init_is_deterministic():
    a, b, c = build_model("tiny", seed=0), build_model("tiny", seed=0), build_model("tiny", seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, c.layers[0].mlp.up_proj.weight)
    # meta -> to_empty -> init_weights gives the same model (and re-ties tied embeddings)
    cfg = PRESETS["tiny"].replace(tie_embeddings=True)
    with torch.device("meta"):
        m = Llama(cfg)
    m.to_empty(device="cpu")
    m.init_weights(5)
    ref = build_model(cfg, seed=5)
    assert m.lm_head.weight is m.embed_tokens.weight
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k


def test_set_attention_routes_every_layer():
    model = build_model("tiny", seed=0)
    ids, positions = _inputs(512, seq=12)
    with torch.no_grad():
        ref = model(ids, positions)
    calls = []

    def spy(q, k, v, *, causal=True, softmax_scale=None):
        calls.append((q.shape, k.shape, causal, softmax_scale))
        return default_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)

    keys = set(model.state_dict())
    model.set_attention(spy)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        out = model(ids, positions)
    cfg = model.config
    assert calls == [((2, 12, cfg.n_heads, cfg.head_dim), (2, 12, cfg.n_kv_heads, cfg.head_dim), True,
                      cfg.head_dim ** -0.5)] * cfg.n_layers
    assert torch.equal(out, ref)

    # a different function gives a different output (here: attention that ignores causality)
    model.set_attention(lambda q, k, v, *, causal=True, softmax_scale=None:
                        default_attention(q, k, v, causal=False, softmax_scale=softmax_scale))
    with torch.no_grad():
        assert (model(ids, positions) - ref).abs().max() > 1e-4
    model.set_attention(None)
    with torch.no_grad():
        assert torch.equal(model(ids, positions), ref)
    with pytest.raises(ValueError, match="callable"):
        model.set_attention("flash")


def test_activation_checkpointing_same_gradients():
    ids, positions = _inputs(512, seq=10)
    grads = []
    for ckpt in (False, True):
        model = build_model("tiny", seed=2)
        model.set_activation_checkpointing(ckpt)
        model(ids, positions).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_tokenizers_round_trip(tmp_path):
    text = "Grüße, 世界! long context\n\ttabs"
    byte = load_tokenizer()
    assert isinstance(byte, ByteTokenizer) and isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    ids = byte.encode(text)
    assert ids[0] == byte.bos_id and ids[1:] == list(text.encode("utf-8"))
    assert byte.decode(ids) == text
    assert byte.encode(text, add_bos=False, add_eos=True)[-1] == byte.eos_id
    assert len({byte.bos_id, byte.eos_id, byte.pad_id}) == 3 and max(ids) < byte.vocab_size

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["long context attention", "Grüße aus dem Ring", "world " * 20], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))

    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"),
                                                 tok.token_to_id("</s>"))
    ids = hf.encode(text, add_eos=True)
    assert ids == [hf.bos_id] + tok.encode(text).ids + [hf.eos_id]
    assert hf.decode(ids) == text
    assert hf.vocab_size == tok.get_vocab_size()
    # save -> load gives the same tokenizer
    (tmp_path / "copy").mkdir()
    hf.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert (again.bos_id, again.eos_id, again.encode(text)) == (hf.bos_id, hf.eos_id, hf.encode(text))
    # a checkpoint saved with its tokenizer carries the ids in config.json and the files beside it
    save_hf(build_model("tiny"), tmp_path / "ckpt", tokenizer=hf)
    assert load_tokenizer(tmp_path / "ckpt").encode(text) == hf.encode(text)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["bos_token_id"] == hf.bos_id


def test_bad_input(tmp_path, hf_dir):
    _, good = hf_dir
    with pytest.raises(ValueError, match="does not exist"):
        load_hf(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path)

    def copy_with(name, config=None, drop=None, resize=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((good / "config.json").read_text())
        cfg.update(config or {})
        (d / "config.json").write_text(json.dumps(cfg))
        tensors = load_file(good / "model.safetensors")
        if drop:
            del tensors[drop]
        if resize:
            tensors[resize] = tensors[resize][:-1].clone()
        save_file(tensors, d / "model.safetensors")
        return d

    with pytest.raises(ValueError, match="model_type='mistral'"):
        load_hf(copy_with("mistral", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        load_hf(copy_with("drop", drop="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight'.*shape"):
        load_hf(copy_with("resize", resize="model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        load_hf(copy_with("yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}))
    corrupt = copy_with("corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_hf(corrupt)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ValueError, match="no weights"):
        load_hf(tmp_path / "noweights")
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_model("huge")
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
    with pytest.raises(ValueError, match="rope_scaling"):
        PRESETS["tiny"].replace(rope_scaling={"rope_type": "yarn"})
    model = build_model("tiny")
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="must be a dist.models.Llama"):
        save_hf(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
