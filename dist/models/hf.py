"""Hugging Face Llama checkpoints: load a local directory into `Llama`, save `Llama` in the same format.

    model = load_hf("path/to/Meta-Llama-3-8B", dtype=torch.bfloat16, device="cuda")
    save_hf(model, "runs/a/step-100/model")      # config.json + model.safetensors (sharded + index when large)

A directory holds config.json and the weights as model.safetensors, or shards listed in
model.safetensors.index.json (pytorch_model.bin and its index are read too). Our parameter names are HF's
without the "model." prefix (lm_head.weight is the same in both), and our RoPE uses HF's rotate_half
convention, so tensors map 1:1 with no permutation. Writing is atomic: a temporary directory beside the
target, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dist.models.llama import Llama, ModelConfig

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


def hf_name(name: str) -> str:
    """Our parameter name -> HF LlamaForCausalLM name."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    """HF LlamaForCausalLM name -> our parameter name."""
    return name[len("model."):] if name.startswith("model.") else name


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from the dict of a HF Llama config.json (old rope_theta/rope_scaling or new rope_parameters)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ValueError(f"config.json describes model_type={model_type!r}, architectures={archs}; "
                         "only Llama (LlamaForCausalLM) checkpoints are supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json is missing {missing}")
    for key, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, want) != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (need {want!r})")

    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        theta = rope["rope_theta"]
    else:
        theta = hf.get("rope_theta", 10000.0)
        rope = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        rope_scaling = {"rope_type": "llama3"}
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in rope:
                raise ValueError(f"config.json: llama3 rope scaling is missing {k!r}")
            rope_scaling[k] = rope[k]
    else:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only 'default' and 'llama3')")

    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=hf["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict for `cfg`, readable by old (rope_theta/rope_scaling) and new (rope_parameters)
    transformers."""
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_parameters.update(cfg.rope_scaling)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ---------------------------------------------------------------------------------------------------------------
# load


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def _weight_files(path: Path) -> dict[str, list[str]]:
    """{file name: [HF tensor names in it]} (None as the list: every tensor in the file)."""
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        if (path / index_name).is_file():
            try:
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path / index_name} is not a valid index (no weight_map): {e}") from None
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file in files:
                if not (path / file).is_file():
                    raise ValueError(f"{path / index_name} lists shard {file!r}, which does not exist")
            return files
    for single in (SAFETENSORS, TORCH_BIN):
        if (path / single).is_file():
            return {single: None}
    raise ValueError(f"no weights in {path}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                     f"{TORCH_BIN} or {TORCH_BIN_INDEX}")


def _read_tensors(file: Path, names: list[str] | None, keep):
    """Yield (HF name, tensor on CPU, or None where not keep(name)) for `names` (all when None) of a
    safetensors or torch file."""
    if file.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names if names is not None else list(f.keys()):
                    yield name, f.get_tensor(name) if keep(name) else None
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {file}: {e}") from e
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"cannot read {file}: {e}") from e
        for name in names if names is not None else list(state.keys()):
            if name not in state:
                raise ValueError(f"{file} has no tensor {name!r}")
            yield name, state[name] if keep(name) else None


def load_hf(path, dtype=torch.float32, device="cpu") -> Llama:
    """A Llama with the config and weights of the HF Llama checkpoint directory `path`, in `dtype` on `device`."""
    path = Path(path)
    dtype = _as_dtype(dtype)
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory")
    if not (path / CONFIG).is_file():
        raise ValueError(f"model path {str(path)!r} has no {CONFIG}")
    try:
        hf_config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG} is not valid JSON: {e}") from None
    cfg = config_from_hf(hf_config)
    files = _weight_files(path)

    with torch.device("meta"):
        model = Llama(cfg)
    expected = {hf_name(k): v for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}

    def ignored(name):  # HF ignores these too
        return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")

    state, unexpected = {}, []
    for file, names in files.items():
        for name, tensor in _read_tensors(path / file, names, keep=lambda n: n in expected):
            if tensor is None:
                if not ignored(name):
                    unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(f"tensor {name!r} in {path / file} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(expected[name].shape)}")
            state[our_name(name)] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - {hf_name(k) for k in state})
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is missing {len(missing)} tensor(s): {_short(missing)}")
    if unexpected:
        raise ValueError(f"checkpoint {str(path)!r} has {len(unexpected)} tensor(s) a Llama does not: "
                         f"{_short(sorted(unexpected))}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left unloaded"
    return model


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# save


def save_hf(model: Llama, path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None) -> Path:
    """Write `model` to directory `path` in HF format: config.json plus model.safetensors, or shards of at most
    `max_shard_bytes` (a bigger tensor gets a shard of its own) with model.safetensors.index.json. With
    `tokenizer`, also its files and bos/eos/pad ids. An existing `path` is replaced; on error it is untouched.
    A wrapper holding the model as `.module` (DDP, DeepSpeed) is unwrapped. Call it on one rank.
    Returns the path."""
    from safetensors.torch import save_file

    while not isinstance(model, Llama) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module  # DistributedDataParallel, a DeepSpeed engine, ... wrap the model as .module
    if not isinstance(model, Llama):
        raise ValueError(f"save_hf: model must be a dist.models.Llama, got {type(model).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"save_hf: max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_hf: {str(path)!r} exists and is not a directory")
    cfg = model.config

    tensors = {hf_name(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
               if not (cfg.tie_embeddings and k == "lm_head.weight")}
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    hf_config = config_to_hf(cfg, model.embed_tokens.weight.dtype)
    if tokenizer is not None:
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFETENSORS), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing an existing `dst`."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
