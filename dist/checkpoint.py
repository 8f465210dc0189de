"""Training checkpoints: `checkpoint.dir/step-N/`, written atomically.

A folder holds:
    config.json, model*.safetensors   the model in Hugging Face format (dist.models.save_hf)
    optimizer.pt                      train.engine = "torch": AdamW state (replicated: rank 0 writes it)
    optimizer-rank{R}.pt              train.engine = "deepspeed": each rank's ZeRO partition (AdamW state
                                      and fp32 master weights of its slice)
    rng-rank{R}.pt                    each rank's CPU (and CUDA) RNG state
    state.json                        step, data position, world size, engine (and zero stage); written
                                      last: its presence marks the folder complete

The optimizer side goes through the engine's hooks (dist.engine); `save`
and `load` take the engine.

Every rank writes into `step-N.tmp/`; after a barrier rank 0 writes
state.json and renames the folder to `step-N/`, so a crash mid-save leaves
no folder that looks complete. The directory must be on a filesystem every
rank sees (shared storage for multi-node runs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist

log = logging.getLogger("dist.checkpoint")

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step}")


def latest(root: str) -> str | None:
    """Newest complete step-N folder under root, or None."""
    if not os.path.isdir(root):
        return None
    steps = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            steps.append(int(m.group(1)))
    return step_dir(root, max(steps)) if steps else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(root: str, step: int, model, engine, *, rank: int, world_size: int, extra: dict | None = None) -> str:
    """Collective: every rank calls it. `engine`: the dist.engine engine holding the optimizer.
    Returns the final folder path."""
    from dist.models import save_hf

    final = step_dir(root, step)
    tmp = final + ".tmp"
    whole = engine.export_model()  # collective when the engine shards the weights
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(whole, tmp)  # creates tmp/
    dist.barrier()
    engine.save_optimizer(tmp, rank)
    torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        state = {"format_version": FORMAT_VERSION, "step": step, "data_position": step,
                 "world_size": world_size, **engine.checkpoint_meta(), **(extra or {})}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
        if os.path.exists(final):  # saving the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def resolve(resume: str, root: str) -> str | None:
    """checkpoint.resume ("" | "latest" | folder) -> folder to load or None. Raises ValueError."""
    if not resume:
        return None
    if resume == "latest":
        return latest(root)  # None: nothing saved yet, start fresh
    return resume


def step_of(path: str | None) -> int:
    """The step a checkpoint folder holds (its state.json), or -1 when there is none or it is unreadable."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            return int(json.load(f)["step"])
    except (TypeError, OSError, ValueError, KeyError):
        return -1


def load(path: str, model, engine, *, rank: int, world_size: int) -> dict:
    """Restore model, optimizer state (through `engine`, the dist.engine engine) and this rank's RNG from
    `path`; returns state.json's dict. A checkpoint this run cannot resume (incomplete, other engine, other
    world size under ZeRO) is a ValueError on every rank before anything is loaded."""
    from dist.models import load_hf

    state_file = os.path.join(path, "state.json")
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory not found: {path}")
    if not os.path.isfile(state_file):
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: no state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
        int(state["step"])
    except (json.JSONDecodeError, KeyError, ValueError, TypeError):
        raise ValueError(f"checkpoint {path} is corrupt: unreadable state.json") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {state.get('format_version')}, "
                         f"this build reads {FORMAT_VERSION}")
    engine.check_resume(path, state, world_size)
    loaded = load_hf(path)
    try:
        engine.load_model(loaded.state_dict())
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match the configured model: {str(e).splitlines()[0]}") from None
    engine.load_optimizer(path, rank, state)
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if state.get("world_size") == world_size and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif rank == 0:
        log.warning("checkpoint %s was written by %s ranks, this run has %s: RNG states not restored "
                    "(data and weights still resume exactly)", path, state.get("world_size"), world_size)
    return state
