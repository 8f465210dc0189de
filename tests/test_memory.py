"""dist.memory: the estimate against what the real model and engine hold on CPU, and the --estimate-memory CLI.

Saved activations are measured with saved_tensors_hooks (plus tensors custom autograd Functions keep on
their context) on the real model, for each checkpointing mode and SP strategy, and must be within 5% of
the estimate; weights, gradients and AdamW state are counted from the engine after a step and must equal
the estimate's bytes exactly.
"""

import dataclasses

import pytest
import torch

from dist.config import load_config
from dist.memory import (GiB, activation_model, estimate, max_tokens_per_rank, saved_activation_bytes,
                         tokens_per_rank)
from dist.models import build_model, token_losses
from tests.multirank import run_ranks

SEQ = 256
MODES = ("none", "full", "selective")


def _measure(rank, world, strategy, dtype, n_layers, mode):
    """Saved bytes of forward + loss on this rank's shard of a SEQ-token sequence (what train's runner does)."""
    import torch.distributed as dist

    from dist.memory import model_config
    from dist.ringattn import shard
    from dist.seqpar import wrap_model

    cfg = load_config(None, [f"model.dtype={dtype}"])
    model = build_model(model_config(cfg).replace(n_layers=n_layers), dtype=getattr(torch, dtype))
    model.set_activation_checkpointing(mode)
    ids, pos = torch.randint(0, 512, (SEQ,), generator=torch.Generator().manual_seed(0)), torch.arange(SEQ)
    if world > 1:
        wrap_model(model, group=dist.group.WORLD, strategy=strategy, layout="zigzag")
        ids, pos = shard(ids, 0, rank, world, "zigzag"), shard(pos, 0, rank, world, "zigzag")
    with saved_activation_bytes(model) as saved:
        logits = model(ids[None], pos[None])
        loss = token_losses(logits[0], ids).sum()
    saved.add_graph(loss)
    loss.backward()
    return saved.bytes, [p.grad for p in model.parameters()]


def _all_modes(rank, world, strategies, dtypes):
    """Saved bytes per (strategy, dtype, mode, layers); checks on the way that every mode's gradients
    equal "none"'s bit for bit (recomputation reruns the same kernels)."""
    out = {}
    for s in strategies:
        for d in dtypes:
            for n in (1, 2):
                grads = {}
                for m in MODES:
                    out[(s, d, m, n)], grads[m] = _measure(rank, world, s, d, n, m)
                    assert all(torch.equal(a, b) for a, b in zip(grads[m], grads["none"])), (s, d, m, n)
    return out


def _cfg(strategy, dtype, mode, sp):
    return load_config(None, [f"model.dtype={dtype}", f"train.activation_checkpointing={mode}",
                              f"sp.degree={sp}", f"sp.strategy={strategy}", "runtime.device_memory_gb=80"])


def _check_saved(measured, sp):
    for (strategy, dtype, mode, n_layers), got in measured.items():
        if n_layers != 2:
            continue
        cfg = _cfg(strategy, dtype, mode, sp)
        act = activation_model(cfg)
        tokens = SEQ // sp
        per_layer = (got - measured[(strategy, dtype, mode, 1)]) / tokens
        assert per_layer == pytest.approx(act.layer(mode), rel=0.05), (strategy, dtype, mode)
        est = estimate(cfg, sp, tokens=tokens)
        assert got == pytest.approx(sum(est.saved.values()), rel=0.05), (strategy, dtype, mode)


@pytest.mark.timeout(120)
def test_saved_activations_match_estimate_one_rank():
    _check_saved(_all_modes(0, 1, ["tokenring"], ["float32", "bfloat16"]), sp=1)


@pytest.mark.timeout(200)
def test_saved_activations_match_estimate_each_sp_strategy():
    """The ring strategies keep the local q, k, v, out; Ulysses also the all-to-all's output; all-gather
    every rank's K and V (even under full checkpointing). Every strategy's gradients under "full" and
    "selective" equal "none"'s."""
    out = run_ranks(_all_modes, 2, ["tokenring", "ring", "allgather", "ulysses"], ["bfloat16"], timeout_s=180)
    _check_saved(out[0], sp=2)
    assert out[0][("allgather", "bfloat16", "full", 2)] > out[0][("tokenring", "bfloat16", "full", 2)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_engine_static_bytes_exact(dtype):
    """Weights, gradients and AdamW state the torch engine holds after a step == the estimate's bytes."""
    from dist.engine import adamw

    cfg = _cfg("tokenring", dtype, "none", 1)
    model = build_model("tiny", dtype=getattr(torch, dtype))
    opt = adamw(model, cfg)
    model(torch.randint(0, 512, (1, 8))).float().square().mean().backward()
    opt.step()
    params = list(model.parameters())
    held = {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "optimizer: AdamW m, v": sum(t.numel() * t.element_size() for st in opt.state.values()
                                         for t in st.values())}
    assert estimate(cfg, 1).static == held


def test_estimate_follows_the_config():
    """Sequence parallelism divides the activations, checkpointing shrinks them, FSDP shards the static part."""
    base = load_config("launch/llama3-8b-128k.toml", ["runtime.device_memory_gb=80", "train.engine=torch",
                                                      "train.activation_checkpointing=none"])
    def peak(**changes):
        cfg = base
        for section, fields in changes.items():
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
        return estimate(cfg, 8)
    e = peak()
    assert e.tokens == tokens_per_rank(131072, 8, "zigzag") == 16384
    assert sum(peak(sp={"degree": 4}).saved.values()) == pytest.approx(2 * sum(e.saved.values()), rel=1e-3)
    full, sel = peak(train={"activation_checkpointing": "full"}), peak(train={"activation_checkpointing": "selective"})
    assert sum(full.saved.values()) < sum(sel.saved.values()) < sum(e.saved.values())
    fsdp = peak(train={"engine": "fsdp"})
    sharded = sum(v for k, v in fsdp.static.items() if k != "FSDP: gathered root + 2 layers")
    assert sharded <= sum(e.static.values()) / 8 * 1.001


def test_shipped_configs_fit_with_ten_percent_margin():
    for path, world in (("launch/llama3-8b-128k.toml", 8), ("launch/llama3-70b-1m.toml", 64)):
        cfg = load_config(path, ["runtime.device_memory_gb=80"])
        est = estimate(cfg, world)
        assert est.peak_bytes <= 0.9 * 80 * GiB, (path, est.table())


def test_max_tokens_per_rank_is_the_largest_that_fits():
    cfg = load_config("launch/llama3-8b-128k.toml", ["runtime.device_memory_gb=80"])
    n = max_tokens_per_rank(cfg, 8, 80)
    assert n > 16384  # the shipped config's share fits
    assert estimate(cfg, 8, tokens=n).fits and not estimate(cfg, 8, tokens=n + 1).fits
    assert max_tokens_per_rank(cfg, 8, 1) == 0  # 1 GB holds less than the CUDA context


def _cli(capsys, *argv):
    from dist.launch import main

    rc = main(["train", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_estimate_exit_codes_and_last_line(capsys):
    rc, out, _ = _cli(capsys, "--config", "launch/llama3-8b-128k.toml", "--estimate-memory",
                      "--set", "runtime.device_memory_gb=80")
    assert rc == 0 and out.strip().splitlines()[-1].endswith("device_gb=80.00 fits=yes")
    assert "8 ranks" in out  # the world defaults to sp.degree
    rc, out, _ = _cli(capsys, "--config", "launch/llama3-8b-128k.toml", "--estimate-memory", "--world-size", "8",
                      "--set", "runtime.device_memory_gb=80", "--set", "train.engine=torch")
    last = out.strip().splitlines()[-1]
    assert rc == 3 and last.startswith("peak_gb=") and last.endswith("fits=no")
    assert "fits with: --set train.engine=fsdp" in out  # what to change
    rc, out, _ = _cli(capsys, "--config", "launch/llama3-8b-128k.toml", "--estimate-memory",
                      "--set", "runtime.device_memory_gb=80", "--set", "data.seq_len_max=4194304",
                      "--set", "data.tokens_per_step=4194304")
    assert rc == 3
    [line] = [x for x in out.splitlines() if x.startswith("does not fit")]
    assert "data.seq_len_max = 4194304" in line and "GB per GPU" in line


@pytest.mark.parametrize("argv,key", [
    (["--set", "train.activation_checkpointing=most"], "train.activation_checkpointing"),
    (["--set", "train.engine=megatron"], "train.engine"),
    (["--world-size", "6"], "sp.degree"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, key):
    rc, out, err = _cli(capsys, "--config", "launch/llama3-8b-128k.toml", "--estimate-memory",
                        "--set", "runtime.device_memory_gb=80", *argv)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and key in err


def test_cli_without_a_device_size_names_the_key(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = _cli(capsys, "--config", "launch/llama3-8b-128k.toml", "--estimate-memory")
    assert rc == 2 and "runtime.device_memory_gb" in err


def test_refuses_before_oom_on_cuda_unless_told(caplog):
    from dist.memory import check_fits

    cfg = load_config("launch/llama3-8b-128k.toml", ["runtime.device_memory_gb=80", "train.engine=torch"])
    with pytest.raises(ValueError, match=r"exceeds the device \(80\.00 GB\): fits with: --set train\.engine=fsdp"):
        check_fits(cfg, 8, "cuda")
    assert "peak_gb=" in caplog.text  # the table, logged by rank 0
    check_fits(cfg, 8, "cpu")  # host memory is not what the estimate is for
    check_fits(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, ignore_memory_estimate=True)),
               8, "cuda")
    check_fits(load_config("launch/llama3-8b-128k.toml", ["runtime.device_memory_gb=80"]), 8, "cuda")  # fits


def test_estimate_reads_a_hugging_face_folder(tmp_path):
    """model.path: the shapes come from its config.json, the same as the preset it was saved from."""
    from dist.models import save_hf

    save_hf(build_model("tiny"), tmp_path / "m")
    by_path = estimate(load_config(None, [f"model.path={tmp_path}/m", "runtime.device_memory_gb=80"]), 1)
    by_preset = estimate(load_config(None, ["runtime.device_memory_gb=80"]), 1)
    assert (by_path.static, by_path.saved, by_path.peak_bytes) == (by_preset.static, by_preset.saved,
                                                                   by_preset.peak_bytes)


def test_auto_strategy_is_bounded_by_the_strategies_it_may_pick():
    auto = estimate(_cfg("auto", "bfloat16", "none", 2), 2)
    for strategy in ("tokenring", "ring", "allgather", "ulysses"):
        assert auto.peak_bytes >= estimate(_cfg(strategy, "bfloat16", "none", 2), 2).peak_bytes * 0.999, strategy


def test_cli_exit_status_through_the_process():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "dist.launch", "train", "--config", "launch/llama3-8b-128k.toml",
                          "--estimate-memory", "--set", "runtime.device_memory_gb=24"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert run.stdout.strip().splitlines()[-1].endswith("device_gb=24.00 fits=no")
