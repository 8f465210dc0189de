"""The training loop behind `python -m dist.launch train`.

Per step: the global batch (a pure function of seed and step) is dealt to the
data-parallel groups, balancing tokens; each group runs its sequences one by
one (sharded over its sequence-parallel ranks when sp.degree > 1) and
accumulates gradients of sum(token losses) / global target count; the
engine (dist.engine, `train.engine`) sums them over all ranks (that sum also
adds up the per-shard gradients of a sequence-parallel group), clips and
steps AdamW: "torch" with one flat all-reduce, "deepspeed" through ZeRO.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from dist import checkpoint
from dist.config import Config
from dist.data import IGNORE, make_dataset, pack, split_for_dp
from dist.engine import make_engine
from dist.memory import check_fits
from dist.models import token_losses
from dist.fault.inject import maybe_kill
from dist.fault.snapshot import Snapshots
from dist.runtime import Runtime

log = logging.getLogger("dist.train")

def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def build_model(cfg: Config, device):
    from dist.models import build_model as build, load_hf

    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.path:
        model = load_hf(cfg.model.path, dtype=dtype, device=device)
    else:
        model = build(cfg.model.preset, seed=cfg.train.seed).to(device=device, dtype=dtype)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    return model


class SequenceRunner:
    """Runs one sequence (forward + backward through the engine) on this rank's slice of it."""

    def __init__(self, model, rt: Runtime, cfg: Config):
        self.model, self.rt, self.sp = model, rt, rt.mesh.sp
        self.layout = cfg.sp.layout
        if self.sp > 1:
            from dist.ringattn import set_input_checks, shard
            from dist.seqpar import wrap_model

            set_input_checks(cfg.sp.check_inputs)
            self.shard = shard
            self.model = wrap_model(model, group=rt.sp_group, strategy=cfg.sp.strategy, layout=self.layout)

    def step(self, engine, batch, step: int, upcoming=None) -> torch.Tensor:
        """This rank's share of a step: the sequences dealt to its data-parallel group, one pass each
        (plus zero-weighted passes where the engine needs every rank to run as many); float64 [3] sums
        of (loss, recall loss, recall count) over its targets."""
        parts = split_for_dp([len(s) for s in batch.seqs], self.rt.mesh.dp)
        mine = parts[self.rt.dp_index]
        n_micro = engine.micro_steps([len(p) for p in parts], self.rt.dp_index)
        filler = min(range(len(batch.seqs)), key=lambda i: len(batch.seqs[i]))  # zero-weighted passes
        sums = torch.zeros(3, dtype=torch.float64)
        for j in range(n_micro):
            i, weight = (mine[j], 1.0) if j < len(mine) else (filler, 0.0)
            sums += torch.tensor(self(engine, batch.seqs[i], batch.recall_masks[i], batch.num_targets,
                                      last=j == n_micro - 1, weight=weight), dtype=torch.float64)
        return sums

    def close(self) -> None:
        pass

    def __call__(self, engine, seq: torch.Tensor, recall: torch.Tensor, n_global: int, *, last: bool,
                 weight: float = 1.0) -> tuple[float, float, int]:
        """seq: [len] tokens. Returns (loss sum, recall-loss sum, recall count) of this rank's targets.
        `last`: the step's last backward on this rank; `weight` 0 runs a pass that adds zero gradients
        (engines that need the same number of passes on every rank)."""
        dev = self.rt.device
        multiple = 1 if self.sp == 1 else (2 * self.sp if self.layout == "zigzag" else self.sp)
        inputs, labels, positions, recall, _ = pack([seq], [recall], multiple)
        if self.sp > 1:
            r, w = self.rt.sp_index, self.sp
            inputs, labels, positions, recall = (self.shard(x, 0, r, w, self.layout)
                                                 for x in (inputs, labels, positions, recall))
        logits = engine.forward(input_ids=inputs[None].to(dev), position_ids=positions[None].to(dev))
        losses = token_losses(logits[0], labels.to(dev), IGNORE)
        loss = losses.sum() / n_global
        engine.backward(loss if weight == 1.0 else loss * weight, last=last)
        if weight == 0.0:
            return 0.0, 0.0, 0
        recall = recall.to(dev)
        return losses.sum().item(), losses[recall].sum().item(), int(recall.sum())


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_metrics(path: str, start: int):
    """metrics.jsonl for appending; a resumed run keeps the rows up to its start step and drops later ones
    (written by the interrupted run after its last checkpoint), so every step appears once."""
    kept = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a torn last line from a killed run
    f = open(path, "w")
    f.writelines(kept)
    return f


def train(cfg: Config) -> dict:
    """Run training; returns a summary dict (final loss, steps, checkpoint path)."""
    with Runtime.start(cfg) as rt:
        check_fits(cfg, rt.world_size, rt.device.type, rt.rank)  # on CUDA: refuse before running out of memory
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        seed_everything(cfg.train.seed, rt.rank)
        model = build_model(cfg, rt.device)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if cfg.sp.adaptive:  # the planner scatters each batch over SP groups of different sizes
            from dist.seqpar.adaptive import AdaptiveRunner

            runner = AdaptiveRunner(model, rt, cfg)
        else:
            runner = SequenceRunner(model, rt, cfg)  # wraps the model's attention (in place) when sp.degree > 1
        engine = make_engine(cfg, model, rt)
        try:
            return _train(cfg, rt, model, engine, runner, n_params)
        finally:
            runner.close()
            engine.close()


def _train(cfg: Config, rt: Runtime, model, engine, runner: SequenceRunner, n_params: int) -> dict:
    start = 0
    resume_from = checkpoint.resolve(cfg.checkpoint.resume, cfg.checkpoint.dir)
    snaps = Snapshots(cfg, rt, model, engine) if cfg.fault.snapshot_every else None
    restored = snaps.restore(disk_step=checkpoint.step_of(resume_from)) if snaps else None
    if restored is not None:
        start = restored
    elif resume_from:
        state = checkpoint.load(resume_from, model, engine, rank=rt.rank, world_size=rt.world_size)
        start = state["step"]
        if rt.is_main:
            log.info("resumed from %s at step %d", resume_from, start)
    tokenizer = None
    if cfg.data.kind == "jsonl":
        from dist.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.path or None)
    data = make_dataset(cfg, model.config.vocab_size, tokenizer)

    metrics_file = None
    if rt.is_main:
        os.makedirs(cfg.log.dir, exist_ok=True)
        metrics_file = open_metrics(os.path.join(cfg.log.dir, "metrics.jsonl"), start)
        log.info("%s | model %.2fM params | engine %s | %d steps from %d | %d tokens/step",
                 rt, n_params / 1e6, engine.name, cfg.train.steps, start, cfg.data.tokens_per_step)
    bar = None
    if rt.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=None)
    last = {}
    saved = None
    try:
        upcoming = data.batch(start) if start < cfg.train.steps else None
        for step in range(start, cfg.train.steps):
            t0 = time.perf_counter()
            batch = upcoming  # each batch is built once, a step ahead (the adaptive planner plans it early)
            upcoming = data.batch(step + 1) if step + 1 < cfg.train.steps else None
            n_global = batch.num_targets
            sums = runner.step(engine, batch, step, upcoming)  # forward + backward of this rank's share
            lr = lr_at(step, cfg)
            if snaps:
                snaps.wait_copied()  # the snapshot in flight has read the tensors the optimizer changes
            grad_norm = engine.step(lr)  # sums gradients over all ranks, clips, steps AdamW
            dist.all_reduce(sums)  # loss sums over every rank's targets
            dt = time.perf_counter() - t0
            loss = sums[0].item() / n_global
            last = {"step": step + 1, "loss": loss, "tokens": n_global,
                    "tokens_per_s": n_global / dt, "step_s": dt, "lr": lr,
                    "grad_norm": grad_norm, "sequences": len(batch.seqs),
                    "recall_loss": sums[1].item() / sums[2].item() if sums[2] > 0 else None,
                    "mem_mb": memory_mb(rt.device)}
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}")
            if rt.is_main and ((step + 1) % cfg.log.every == 0 or step + 1 == cfg.train.steps):
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                mem=f"{last['mem_mb']:.0f}MB", refresh=False)
            if bar:
                bar.update(1)
            done = step + 1 == cfg.train.steps
            if cfg.checkpoint.dir and ((cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or done):
                saved = checkpoint.save(cfg.checkpoint.dir, step + 1, model, engine, rank=rt.rank,
                                        world_size=rt.world_size)
            if snaps:
                snaps.after_step(step + 1)
            maybe_kill(cfg.fault, rt.rank, step + 1, "step", snaps.dir if snaps else None)
        if snaps:
            snaps.close()
    finally:
        if bar:
            bar.close()
        if metrics_file:
            metrics_file.close()
    if rt.is_main:
        log.info("done: step %s loss %.4f%s", last.get("step", start), last.get("loss", float("nan")),
                 f" | checkpoint {saved}" if saved else "")
    return {**last, "checkpoint": saved, "model": model, "optimizer": engine.optimizer, "engine": engine.name,
            "start": start}
