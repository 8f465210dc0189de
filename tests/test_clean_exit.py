"""Clean exit: a wrapped transformers model trained a step under torchrun exits with status 0.

The shared-memory transport this package once had left a daemon thread copying at interpreter exit,
and a thread killed inside a torch call aborts the process ("terminate called without an active
exception"). Nothing of ours may outlive the work: after destroy_process_group only the main thread
is alive, and both ranks exit 0."""

import os
import subprocess
import sys

import pytest

from tests.multirank import free_port

SCRIPT = """
import copy, sys, threading
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from dist.ringattn import shard
from dist.seqpar import wrap_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
sp = wrap_model(copy.deepcopy(LlamaForCausalLM(cfg)), strategy="tokenring")
ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
pos = torch.arange(32)[None]
out = sp(input_ids=shard(ids, 1, rank, world, "zigzag"), position_ids=shard(pos, 1, rank, world, "zigzag"))
out.logits.float().pow(2).mean().backward()
for p in sp.parameters():
    if p.grad is not None:
        dist.all_reduce(p.grad)
dist.destroy_process_group()
with open(f"alive-{rank}.txt", "w") as f:  # a file per rank: two ranks' prints interleave on one pipe
    f.write(repr(sorted(t.name for t in threading.enumerate())))
sys.exit(0)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wrapped_transformers_model_exits_cleanly(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                               str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
        alive = [(tmp_path / f"alive-{rank}.txt").read_text() for rank in range(2)]
        assert alive == ["['MainThread']"] * 2, alive
