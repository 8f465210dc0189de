"""The optimizer side of a training step, behind `train.engine`.

    engine = make_engine(cfg, model, rt)
    for j in range(engine.micro_steps(counts, rt.dp_index)):   # forward/backward passes this rank runs
        logits = engine.forward(input_ids=..., position_ids=...)
        engine.backward(loss, last=j == n - 1)                 # loss = sum(token losses) / global targets
    grad_norm = engine.step(lr)                                 # gradients SUMMED over all ranks, clip, AdamW

Both engines take the same AdamW (two groups: weight decay on matrices, none
on vectors) and produce the same update:

- `TorchEngine` ("torch"): plain autograd accumulation on every rank, one
  flat all-reduce (sum) over all ranks, clipping, AdamW; the optimizer state
  is replicated (rank 0 saves `optimizer.pt`).
- `DeepSpeedEngine` ("deepspeed"): DeepSpeed ZeRO stage 1 (optimizer state
  partitioned over all ranks) or 2 (gradients partitioned too) around that
  AdamW; every rank saves its partition as `optimizer-rank{R}.pt`.
- `FSDPEngine` ("fsdp"): torch FSDP2, weights, gradients and AdamW state
  sharded over all ranks; the optimizer state saved with
  torch.distributed.checkpoint (`optimizer/`).

Checkpoint hooks (`checkpoint_meta`, `save_optimizer`, `check_resume`,
`load_optimizer`) are called by `dist.checkpoint` inside its atomic step-N.tmp
-> step-N save; the model itself is saved the same way by every engine
(`export_model` gives rank 0 the whole weights, `load_model` takes them).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger("dist.engine")

DEEPSPEED_HINT = "pip install 'dist[deepspeed]'"


def adamw(model, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices, none on vectors (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.train.lr, betas=tuple(cfg.train.betas), foreach=False)


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum gradients over all ranks in one flat buffer (missing grads count as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def clip_and_step(params: list, optimizer, lr: float, grad_clip: float) -> float:
    """Clip the gradients' global norm to grad_clip (0: no clipping), AdamW at `lr`, zero the gradients;
    returns the pre-clip norm (also when clipping is off, as DeepSpeed's engine does). Sharded (DTensor)
    gradients give the norm over all shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))  # inf: x 1.0
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def make_engine(cfg, model, rt):
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(cfg, model, rt)
    if cfg.train.engine == "fsdp":
        return FSDPEngine(cfg, model, rt)
    return TorchEngine(cfg, model, rt)


class TorchEngine:
    """Autograd accumulation, one flat all-reduce (sum) over all ranks, clipping, torch AdamW."""

    name = "torch"
    replicated = True   # every rank holds the same model and optimizer state

    def __init__(self, cfg, model, rt):
        self.model, self.cfg = model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(model, cfg)

    def forward(self, **inputs):
        return self.model(**inputs)

    def micro_steps(self, counts: list[int], dp_index: int) -> int:
        """Forward/backward passes this rank runs for a step whose data-parallel groups got `counts`
        sequences: only its own (the all-reduce in step() does not care how many there were)."""
        return counts[dp_index]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        """Sum gradients over all ranks, clip, AdamW at `lr`; returns the pre-clip gradient norm
        (also when clipping is off, as DeepSpeed's engine does)."""
        all_reduce_grads(self.params)
        return clip_and_step(self.params, self.optimizer, lr, self.cfg.train.grad_clip)

    # ------------------------------------------------------------ checkpoint hooks

    def export_model(self):
        """The model with whole weights, for the Hugging Face export (collective under FSDP)."""
        return self.model

    def load_model(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)

    def checkpoint_meta(self) -> dict:
        return {"engine": self.name}

    def save_optimizer(self, folder: str, rank: int) -> None:
        if rank == 0:  # replicated: one copy
            torch.save(self.optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))

    def check_resume(self, path: str, state: dict, world_size: int) -> None:
        """Raise ValueError before anything is loaded if `path` cannot be resumed by this engine."""
        _check_engine(path, state, self.name)
        if not os.path.isfile(os.path.join(path, "optimizer.pt")):
            raise ValueError(f"checkpoint {path} is incomplete or corrupt: no optimizer.pt")

    def load_optimizer(self, path: str, rank: int, state: dict) -> None:
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                                  weights_only=True))

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)

    def close(self) -> None:
        pass


def _check_engine(path: str, state: dict, name: str) -> None:
    saved = state.get("engine", "torch")  # checkpoints from before train.engine existed are torch's
    if saved != name:
        raise ValueError(f"checkpoint {path} was written with train.engine = {saved!r}, this run uses "
                         f"train.engine = {name!r}; the optimizer state of one cannot be loaded by the other: "
                         f"resume with train.engine = {saved!r}")


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 1 or 2 around the same AdamW, on the process group dist.runtime built.

    What DeepSpeed's source (0.19) forces, and how it is met here:
    - ZeRO-2 reduces gradients inside backward hooks (bucketed collectives over all ranks), ZeRO-1 in the
      backward of the accumulation boundary: every rank must run the same number of backward passes per
      step in the same order. Data-parallel groups get different numbers of sequences, so every rank runs
      max-over-groups passes (`micro_steps`); the extra ones are zero-weighted passes over a real sequence,
      which touch every parameter in the same order and add exact zeros.
    - The number of passes changes from step to step while `gradient_accumulation_steps` is fixed (1, so
      engine.backward never divides the loss): each backward sets the accumulation boundary explicitly
      (True only on the last pass; ZeRO accumulates the reduced partitions until then) and step() calls
      engine.step() once.
    - Gradients must be summed over all ranks (our loss is already sum / global target count, and
      sequence-parallel ranks hold partial gradients): `gradient_allreduce_op = "sum"` (default "mean"
      would divide by the world size).
    - The ZeRO data-parallel group is the whole world (DeepSpeed clones it): optimizer state is
      partitioned over data- and sequence-parallel ranks alike, which hold the same replica.
    - Clipping (`gradient_clipping`) and the gradient norm come from ZeRO (norm in fp64 over partitions).
    """

    name = "deepspeed"
    replicated = False  # each rank holds its ZeRO partition (the model follows from its fp32 master weights)

    def __init__(self, cfg, model, rt):
        from dist.config import ConfigError

        if rt.device.type == "cpu":  # e.g. runtime.backend = "gloo" on a GPU machine: DeepSpeed must not pick CUDA
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as e:
            raise ConfigError(f"config key 'train.engine' = \"deepspeed\" needs DeepSpeed, which does not import "
                              f"({e}): {DEEPSPEED_HINT}") from None
        if cfg.log.level != "debug":
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            logging.getLogger("deepspeed").setLevel(logging.WARNING)
        self.cfg, self.rt, self.model = cfg, rt, model
        self.zero_stage = cfg.train.zero_stage
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        bucket = int(min(5e7, n_params + n_params % 2))  # elements; small models: one bucket per backward
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(cfg.train.grad_clip),
            "gradient_allreduce_op": "sum",
            "zero_optimization": {"stage": self.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                                  "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.model.dtype == "float16"},
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        # DeepSpeed asserts torchrun's variables; a plain `python -m dist.launch` (one rank) has none
        for key, value in (("LOCAL_RANK", rt.local_rank), ("RANK", rt.rank), ("WORLD_SIZE", rt.world_size)):
            os.environ.setdefault(key, str(value))
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                                category=FutureWarning)  # DeepSpeed's call, on every ZeRO step
        deepspeed.init_distributed(dist_backend=rt.backend)  # wraps the existing default group
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, cfg),
                                                                 config=ds_config)
        if torch.device(self.engine.device).type != rt.device.type:
            raise ValueError(f"DeepSpeed runs on {self.engine.device} but this rank runs on {rt.device} "
                             f"(DeepSpeed was imported earlier with another accelerator; DS_ACCELERATOR picks it)")

    def forward(self, **inputs):
        return self.engine(**inputs)

    def micro_steps(self, counts: list[int], dp_index: int) -> int:
        """Every rank runs as many passes as the busiest data-parallel group (see the class docstring)."""
        return max(counts)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------ checkpoint hooks

    def export_model(self):
        return self.model

    def load_model(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)

    def checkpoint_meta(self) -> dict:
        return {"engine": self.name, "zero_stage": self.zero_stage}

    @staticmethod
    def _file(folder: str, rank: int) -> str:
        return os.path.join(folder, f"optimizer-rank{rank}.pt")

    def optimizer_state(self) -> dict:
        """This rank's partition: AdamW state of its slice, its fp32 master weights, paddings.
        DeepSpeed's pickled objects (loss scaler, slice mappings, enums) are dropped or turned into plain
        values so the state loads with torch.load(weights_only=True). Tensors are the live ones."""
        from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS, ZERO_STAGE

        sd = self.optimizer.state_dict()
        scaler = sd.pop(LOSS_SCALER, None)
        sd.pop(PARAM_SLICE_MAPPINGS, None)
        sd[ZERO_STAGE] = int(sd[ZERO_STAGE])
        sd["dist_loss_scaler"] = {k: v for k, v in vars(scaler).items()
                                  if isinstance(v, (bool, int, float))} if scaler is not None else {}
        return sd

    def save_optimizer(self, folder: str, rank: int) -> None:
        torch.save(self.optimizer_state(), self._file(folder, rank))

    def check_resume(self, path: str, state: dict, world_size: int) -> None:
        _check_engine(path, state, self.name)
        saved_stage = state.get("zero_stage")
        if saved_stage != self.zero_stage:
            raise ValueError(f"checkpoint {path} was written with train.zero_stage = {saved_stage}, this run uses "
                             f"train.zero_stage = {self.zero_stage}: resume with the same stage")
        saved_world = state.get("world_size")
        if saved_world != world_size:
            raise ValueError(f"checkpoint {path} was written by {saved_world} ranks, this run has {world_size}: "
                             f"train.engine = \"deepspeed\" partitions the optimizer state over the ranks, so "
                             f"resume with {saved_world} ranks")
        missing = [r for r in range(world_size) if not os.path.isfile(self._file(path, r))]
        if missing:  # every rank checks every file, so all ranks fail together instead of some hanging
            raise ValueError(f"checkpoint {path} is incomplete or corrupt: no optimizer-rank{missing[0]}.pt")

    def load_optimizer(self, path: str, rank: int, state: dict) -> None:
        """Restore this rank's AdamW state and its fp32 master weights (not re-derived from the model's
        weights, which would round under bf16/fp16), so the resumed run continues bit-exactly."""
        self.load_optimizer_state(torch.load(self._file(path, rank), map_location="cpu", weights_only=True))

    def load_optimizer_state(self, sd: dict) -> None:
        """Restore what optimizer_state() returned (this rank's partition) and the model weights from it."""
        scaler = sd.pop("dist_loss_scaler", {})
        dp_rank = dist.get_rank(group=self.optimizer.dp_process_group)
        # a rigid (non-elastic) ZeRO checkpoint: load_state_dict reads only this rank's entry of the list
        sd_list = [None] * dist.get_world_size(group=self.optimizer.dp_process_group)
        sd_list[dp_rank] = sd
        self.optimizer.load_state_dict(sd_list, load_optimizer_states=True, load_from_fp32_weights=True)
        for k, v in scaler.items():
            setattr(self.optimizer.loss_scaler, k, v)
        self.optimizer.clip_grad = float(self.cfg.train.grad_clip)  # the state dict restores the saved one
        self.optimizer.update_lp_params()  # model weights = the restored master weights, on every rank

    def close(self) -> None:
        """Release the engine and DeepSpeed's cached clone of the world group, so a later run in the same
        process (after the process group is rebuilt) starts clean."""
        try:
            self.engine.destroy()
        finally:
            try:
                from deepspeed.utils import groups

                groups._release_process_group_references(None)
            except (ImportError, AttributeError):  # pragma: no cover - other DeepSpeed versions
                pass


class FSDPEngine:
    """torch FSDP2: every decoder layer and the root sharded with `fully_shard` over one mesh of all ranks.

    Sequence-parallel ranks hold the same parameters as their data-parallel peers, so they shard them
    too (as torchtitan does): each rank keeps 1/world of the weights, gradients and AdamW state, and
    gathers a layer's weights only while it runs. With model.dtype bfloat16 (or float16) the weights,
    gradients and AdamW state stay in that dtype, as with the torch engine, and gradients are
    reduce-scattered in float32.

    - Gradients are summed over all ranks (our loss is already sum / global target count, and
      sequence-parallel ranks hold partial gradients): the reduce-scatter's divide factor is 1.
    - Every forward all-gathers and every backward reduce-scatters over all ranks, so every rank runs
      as many passes as the busiest data-parallel group (`micro_steps`, zero-weighted extra passes,
      as the DeepSpeed engine does); each pass's reduce-scatter adds into the sharded gradients.
    - Checkpoints: the optimizer state with torch.distributed.checkpoint (optimizer/, one shard per
      rank, reshardable); the weights as the same Hugging Face folder as the other engines, gathered
      to rank 0 (`export_model`) and sharded again on load (`load_model`).
    """

    name = "fsdp"
    replicated = False  # each rank holds its shard of the weights and of the AdamW state

    def __init__(self, cfg, model, rt):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.cfg, self.rt, self.model = cfg, rt, model
        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        low = getattr(torch, cfg.model.dtype)
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low != torch.float32 else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for layer in model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        for module in (*model.layers, model):  # each fully_shard'ed module has its own settings
            module.set_gradient_divide_factor(1.0)  # a sum, not a mean
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(model, cfg)

    def forward(self, **inputs):
        return self.model(**inputs)

    def micro_steps(self, counts: list[int], dp_index: int) -> int:
        """Every rank runs as many passes as the busiest data-parallel group (see the class docstring)."""
        return max(counts)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        """Gradients are already reduce-scattered (sums) by backward; clip over the shards, AdamW."""
        return clip_and_step(self.params, self.optimizer, lr, self.cfg.train.grad_clip)

    # ------------------------------------------------------------ checkpoint hooks

    def export_model(self):
        """Collective: a plain model with the whole weights on rank 0 (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from dist.models import build_model

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rt.rank != 0:
            return None
        plain = build_model(self.model.config, device="meta", dtype=next(iter(full.values())).dtype)
        plain.load_state_dict(full, assign=True)  # no copy: rank 0's host holds the whole weights once
        plain.tie_weights()
        return plain

    def load_model(self, state_dict: dict) -> None:
        """Collective: shard the whole weights of `state_dict` (every rank passes the same) into the model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state_dict, options=StateDictOptions(full_state_dict=True))

    def checkpoint_meta(self) -> dict:
        return {"engine": self.name}

    def save_optimizer(self, folder: str, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                 checkpoint_id=os.path.join(folder, "optimizer"))

    def check_resume(self, path: str, state: dict, world_size: int) -> None:
        _check_engine(path, state, self.name)
        if not os.path.isfile(os.path.join(path, "optimizer", ".metadata")):
            raise ValueError(f"checkpoint {path} is incomplete or corrupt: no optimizer/.metadata")

    def optimizer_state(self) -> dict:
        """This rank's shards, for in-memory snapshots: the local pieces of the weights and of their AdamW
        state, by parameter name (live tensors)."""
        from torch.distributed.tensor import DTensor

        def local(v):
            return v.to_local() if isinstance(v, DTensor) else v

        named = dict(self.model.named_parameters())
        return {"params": {n: p.to_local() for n, p in named.items()},
                "state": {n: {k: local(v) for k, v in self.optimizer.state[p].items()}
                          for n, p in named.items() if p in self.optimizer.state}}

    @torch.no_grad()
    def load_optimizer_state(self, sd: dict) -> None:
        """The inverse of optimizer_state on the same world: shards copied in, AdamW state rebuilt on them."""
        from torch.distributed.tensor import DTensor

        for n, p in self.model.named_parameters():
            p.to_local().copy_(sd["params"][n])
            if n in sd["state"]:
                self.optimizer.state[p] = {
                    k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride()) if v.dim() else v.clone()
                    for k, v in sd["state"][n].items()}

    def load_optimizer(self, path: str, rank: int, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        sd = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(sd, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, sd["optimizer"])

    def close(self) -> None:
        pass
