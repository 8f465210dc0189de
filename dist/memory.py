"""Per-GPU memory estimate of a training config, before anything is launched.

    est = estimate(cfg, world_size=8)                 # dist.config.Config
    print(est.table()); est.peak_bytes, est.fits
    max_tokens_per_rank(cfg, world_size=8, device_gb=80)   # the planner's per-rank token capacity

`python -m dist.launch train --config F --estimate-memory [--world-size N]` prints `est.table()`.

What one rank holds at its peak, for the longest sequence of the config (a rank runs one sequence
at a time, its 1/sp.degree share; see dist/train.py):

- static: weights, gradients and AdamW state, as the engine keeps them ("torch": replicated in the
  model's dtype; "deepspeed": bf16/fp16 weights + fp32 master weights and AdamW state partitioned over
  all ranks (ZeRO 1), gradients too (ZeRO 2); "fsdp": weights, gradients and AdamW state all sharded
  over all ranks, dim 0 padded to a multiple of the world size; while forward and backward run, the
  root's weights (embedding, lm_head) and two layers' are gathered whole).
- saved activations, by layer part, from what autograd keeps in this repository's model (counted with
  saved_tensors_hooks, see `saved_activation_bytes`): per token and layer, the attention half keeps its
  norm's float32 input and output, the q/k/v projection input, q, k, v, the attention output and
  log-sum-exp; the MLP half its norm's, its input and four [ffn_dim] SwiGLU tensors. Checkpointing
  "full" keeps one [dim] layer input instead, "selective" keeps the attention half and the MLP's input.
  The head keeps the logits ([vocab] per token in the model's dtype) and a float32 log-sum-exp per
  token: dist.models.loss never holds float32 log-probabilities for the whole sequence.
- transient, the largest of: the layer being recomputed in backward (checkpointing) with its
  gradients and attention and ring buffers (blocks in flight, float32 accumulators), the logits'
  gradient (plus the loss's float32 chunks), DeepSpeed's reduce bucket; after backward, when the activations are freed: the
  torch engine's flat all-reduce copy of all gradients, FSDP's root gradients.
- a margin for the allocator's fragmentation (10%) and the CUDA context (1 GiB).

GB here means GiB (2**30 bytes), as torch.cuda reports device memory. Sizes follow the model's dtype
(`model.dtype`); sequence lengths are `data.seq_len_max` padded as the SP layout requires.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch

from dist.models.loss import chunk_rows as loss_chunk_rows

GiB = 2 ** 30
FRAGMENTATION = 0.10      # allocator margin: a fraction of everything else
CUDA_CONTEXT = 1 * GiB    # CUDA context + NCCL buffers, outside torch's allocator
FP32 = 4


def model_config(cfg):
    """The dist.models.ModelConfig the run would build (a preset, or model.path's config.json)."""
    from dist.models.hf import config_from_hf
    from dist.models.llama import PRESETS

    if cfg.model.path:
        path = os.path.join(cfg.model.path, "config.json")
        if not os.path.isfile(path):
            from dist.config import ConfigError

            raise ConfigError(f"config key 'model.path': no config.json in {cfg.model.path}")
        with open(path) as f:
            return config_from_hf(json.load(f))
    return PRESETS[cfg.model.preset].replace()


def param_shapes(mcfg) -> list[tuple[int, ...]]:
    """Shapes of the model's distinct parameters (built on the meta device: nothing allocated)."""
    from dist.models import build_model

    model = build_model(mcfg, device="meta")
    return [tuple(p.shape) for p in model.parameters()]


def _sharded_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 split in world parts, padded to equal parts."""
    rows = math.ceil(shape[0] / world)
    return rows * math.prod(shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# activations, bytes per token


@dataclass(frozen=True)
class ActivationModel:
    """Bytes autograd keeps per token, by part, for this repository's Llama (see the module docstring)."""

    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int
    itemsize: int   # the model's dtype
    strategy: str   # SP strategy ("none" when sp.degree = 1)
    sp: int

    def norm(self) -> int:
        """RMSNorm: its float32 input (a copy unless already float32), 1/rms, its output in the model's dtype."""
        return FP32 * self.dim + FP32 + self.itemsize * self.dim

    def attention_half(self) -> int:
        b, hd, kd = self.itemsize, self.heads * self.head_dim, self.kv_heads * self.head_dim
        part = self.norm() + b * self.dim              # norm; q/k/v projections' input
        part += b * (2 * hd + 2 * kd) + FP32 * self.heads  # q, k, v, output; lse (float32)
        if self.ulysses():                             # o_proj's input is the all-to-all's output, not the kernel's
            part += b * hd
        return part + self.gathered_kv()

    def ulysses(self) -> bool:
        """Ulysses runs: chosen, or possible under "auto" (which may pick it; counted to stay an upper bound)."""
        possible = self.sp > 1 and self.heads % self.sp == 0 and self.kv_heads % self.sp == 0
        return self.strategy == "ulysses" or (self.strategy == "auto" and possible)

    def gathered_kv(self) -> int:
        """"allgather" keeps every rank's K and V on its autograd context, even under checkpointing
        ("auto" may pick it: counted to stay an upper bound)."""
        kept = self.sp > 1 and self.strategy in ("allgather", "auto")
        return self.sp * 2 * self.itemsize * self.kv_heads * self.head_dim if kept else 0

    def mlp_half(self) -> int:
        b = self.itemsize
        return self.norm() + b * self.dim + 4 * b * self.ffn_dim  # norm, input; gate, silu, up, product

    def layer(self, mode: str) -> int:
        """Saved bytes per token of one layer under checkpointing `mode`."""
        if mode == "full":
            return self.itemsize * self.dim + self.gathered_kv()  # the layer's input
        if mode == "selective":
            return self.attention_half() + self.itemsize * self.dim  # + the MLP half's input
        return self.attention_half() + self.mlp_half()

    def outside_layers(self) -> int:
        """Token ids (int64), RoPE cos/sin, the final norm and lm_head's input."""
        return 8 + 2 * self.itemsize * self.head_dim + self.norm() + self.itemsize * self.dim

    def head(self) -> int:
        """What the loss keeps (dist.models.loss): the logits, a float32 log-sum-exp, the label (int64)
        and whether it counts (bool)."""
        return self.itemsize * self.vocab + FP32 + 8 + 1

    def head_backward(self) -> int:
        """Transient at the head: the logits' gradient in the model's dtype (two of the loss's float32
        [rows, vocab] chunks, whatever the length, are added once by `estimate`)."""
        return self.itemsize * self.vocab

    def recompute(self, mode: str) -> int:
        """Transient while backward recomputes one layer (its saved tensors, minus what is kept anyway)."""
        if mode == "full":
            return self.layer("none") - self.layer("full")
        if mode == "selective":
            return self.mlp_half()
        return 0

    def layer_backward(self) -> int:
        """Transient gradients inside one layer's backward: the SwiGLU's [ffn_dim] gradients (3) and the
        residual stream's and a projection's [dim] gradients (float32 accumulation of the residual)."""
        return 3 * self.itemsize * self.ffn_dim + (FP32 + 2 * self.itemsize) * self.dim

    def attention_buffers(self) -> int:
        """Attention's transient buffers per local token: float32 accumulators of the output (forward)
        or dq, dk, dv (backward), plus the strategy's blocks in flight."""
        b, h = self.itemsize, self.heads
        hd, kd = h * self.head_dim, self.kv_heads * self.head_dim
        acc = FP32 * (hd + 2 * kd) + FP32 * h
        if self.sp == 1:
            return acc
        if self.strategy == "auto":                  # whichever it picks (the largest: an upper bound)
            return max(dataclasses.replace(self, strategy=s).attention_buffers()
                       for s in ("tokenring", "ring", "allgather") + (("ulysses",) if self.ulysses() else ()))
        if self.strategy == "tokenring":             # q, dout and row stats travel, dq comes back; 2 in flight
            return acc + 2 * (2 * b * hd + 2 * FP32 * h) + 2 * b * hd
        if self.strategy == "ring":                  # k, v travel (double-buffered); dk, dv accumulators travel
            return acc + 2 * 2 * b * kd + 2 * 2 * FP32 * kd
        if self.strategy == "allgather":             # float32 dk, dv of every rank, summed by an all-to-all
            return acc + 2 * self.sp * 2 * FP32 * kd
        if self.strategy == "ulysses":               # all-to-all send and receive copies of q, k, v, out
            return acc + 2 * b * (2 * hd + 2 * kd)
        raise ValueError(f"unknown strategy {self.strategy!r}")


def activation_model(cfg, mcfg=None) -> ActivationModel:
    mcfg = mcfg or model_config(cfg)
    sp = cfg.sp.degree
    return ActivationModel(dim=mcfg.dim, heads=mcfg.n_heads, kv_heads=mcfg.n_kv_heads, head_dim=mcfg.head_dim,
                           ffn_dim=mcfg.ffn_dim, vocab=mcfg.vocab_size,
                           itemsize=torch.empty(0, dtype=getattr(torch, cfg.model.dtype)).element_size(),
                           strategy=cfg.sp.strategy if sp > 1 else "none", sp=sp)


def tokens_per_rank(seq_len: int, sp: int, layout: str) -> int:
    """A sequence of seq_len tokens (seq_len - 1 inputs) padded as dist.train pads it, per SP rank."""
    n = seq_len - 1
    if sp > 1:
        multiple = 2 * sp if layout == "zigzag" else sp
        n += -n % multiple
    return math.ceil(n / sp)


# ---------------------------------------------------------------------------------------------------------------
# the estimate


@dataclass
class Estimate:
    """Per-rank bytes by row. Peak = static + the larger of (saved activations + the largest transient of
    forward/backward) and the largest transient after backward (activations freed), + margin."""

    world_size: int
    tokens: int                        # per rank, for the longest sequence
    static: dict[str, int] = field(default_factory=dict)
    saved: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)
    after_backward: dict[str, int] = field(default_factory=dict)
    margin: int = 0
    device_bytes: int | None = None
    describe: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.subtotal + self.margin

    @property
    def subtotal(self) -> int:
        during = sum(self.saved.values()) + max(self.transient.values(), default=0)
        return sum(self.static.values()) + max(during, max(self.after_backward.values(), default=0))

    @property
    def fits(self) -> bool:
        return self.device_bytes is not None and self.peak_bytes <= self.device_bytes

    def table(self, notes: tuple[str, ...] = ()) -> str:
        """The rows, then `notes`, then the last line `peak_gb=<x> device_gb=<y> fits=<yes|no>`."""
        def gb(x):
            return f"{x / GiB:9.2f}"
        rows = [(f"{title}: {name}", value) for title, part in (("static", self.static),
                ("saved activations", self.saved), ("transient", self.transient),
                ("after backward", self.after_backward)) for name, value in part.items()]
        rows.append(("margin: allocator 10% + CUDA context", self.margin))
        width = max(len(name) for name, _ in rows) + 2
        top = max(self.transient, key=self.transient.get) if self.transient else None
        lines = [self.describe, f"{'per GPU':{width}s} {'GB':>9s}"]
        for name, value in rows:
            mark = "  <- largest transient" if name == f"transient: {top}" else ""
            lines.append(f"  {name:{width - 2}s} {gb(value)}{mark}")
        lines.extend(notes)
        device = f"{self.device_bytes / GiB:.2f}" if self.device_bytes is not None else "unknown"
        fits = "yes" if self.fits else "no"
        lines.append(f"peak_gb={self.peak_bytes / GiB:.2f} device_gb={device} fits={fits}")
        return "\n".join(lines)


def detected_device_bytes() -> int | None:
    """Memory of this machine's GPU 0, or None without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def device_bytes_for(cfg) -> int | None:
    """runtime.device_memory_gb when set, else the detected GPU's memory, else None."""
    if cfg.runtime.device_memory_gb > 0:
        return int(cfg.runtime.device_memory_gb * GiB)
    return detected_device_bytes()


def estimate(cfg, world_size: int, *, tokens: int | None = None, device_bytes: int | None = None,
             mcfg=None) -> Estimate:
    """Peak memory of one rank of `cfg` on `world_size` ranks (see the module docstring).

    tokens: tokens per rank to size activations for (default: the longest sequence's share);
    device_bytes: what to compare with (default: runtime.device_memory_gb, else the detected GPU)."""
    mcfg = mcfg or model_config(cfg)
    shapes = param_shapes(mcfg)
    n_params = sum(math.prod(s) for s in shapes)
    act = activation_model(cfg, mcfg)
    b, engine, mode = act.itemsize, cfg.train.engine, cfg.train.activation_checkpointing
    if tokens is None:
        tokens = tokens_per_rank(cfg.data.seq_len_max, cfg.sp.degree, cfg.sp.layout)
    W = world_size
    est = Estimate(world_size=W, tokens=tokens,
                   device_bytes=device_bytes if device_bytes is not None else device_bytes_for(cfg))
    n_layers = mcfg.n_layers
    layer_params = _layer_params(mcfg)
    adam_steps = FP32 * len(shapes)  # AdamW's float32 `step` scalar per parameter tensor

    if engine == "fsdp":
        shard = sum(_sharded_numel(s, W) for s in shapes)
        est.static["weights (sharded)"] = shard * b
        est.static["gradients (sharded)"] = shard * b
        est.static["optimizer: AdamW m, v (sharded)"] = 2 * shard * b + adam_steps
        # gathered while forward and backward run: the root (embedding, final norm, lm_head: FSDP2 keeps
        # the root unsharded from forward to the end of backward) and the layer in use plus the next one
        root_params = n_params - n_layers * layer_params
        est.static["FSDP: gathered root + 2 layers"] = (root_params + 2 * layer_params) * b
        est.after_backward["FSDP: root gradients, reduce-scattered in fp32"] = root_params * (b + FP32)
    elif engine == "deepspeed":
        part = math.ceil(n_params / W)
        est.static["weights"] = n_params * b
        est.static["gradients" + (" (partitioned, fp32)" if cfg.train.zero_stage == 2 else "")] = (
            part * FP32 + n_params * b if cfg.train.zero_stage == 2 else n_params * b)
        est.static["optimizer: fp32 master + AdamW m, v (partitioned)"] = 3 * part * FP32
        bucket = int(min(5e7, n_params))
        est.transient["DeepSpeed reduce bucket"] = 2 * bucket * b
    else:
        est.static["weights"] = n_params * b
        est.static["gradients"] = n_params * b
        est.static["optimizer: AdamW m, v"] = 2 * n_params * b + adam_steps
        # dist.engine.all_reduce_grads: a flat copy of all gradients, then per-parameter copies out of it
        est.after_backward["step: flat gradient all-reduce"] = 2 * n_params * b

    est.saved[f"layers x{n_layers}: {_part_names(mode)}"] = n_layers * act.layer(mode) * tokens
    est.saved["embedding, RoPE, final norm"] = act.outside_layers() * tokens
    est.saved["head: logits and log-sum-exp (kept by the loss)"] = act.head() * tokens
    est.transient["head backward (logits' gradient + fp32 chunks)"] = (
        act.head_backward() * tokens + 2 * FP32 * act.vocab * min(tokens, loss_chunk_rows(act.vocab)))
    est.transient[f"layer backward ({'recompute + ' if mode != 'none' else ''}grads + attention buffers)"] = (
        act.recompute(mode) + act.layer_backward() + act.attention_buffers()) * tokens + (
        layer_params * (b + FP32) if engine == "fsdp" else 0)  # FSDP: the layer's gradients, then in fp32
    est.margin = int(FRAGMENTATION * est.subtotal) + CUDA_CONTEXT
    strategy = cfg.sp.strategy if cfg.sp.degree > 1 else "-"
    est.describe = (f"memory estimate: {cfg.model.path or cfg.model.preset} {cfg.model.dtype}, {W} ranks "
                    f"(dp {W // cfg.sp.degree} x sp {cfg.sp.degree}, {strategy}), engine {engine}, "
                    f"checkpointing {mode}, {tokens} tokens per rank (sequence {cfg.data.seq_len_max})")
    return est


def _layer_params(mcfg) -> int:
    d, hd, kd, f = mcfg.dim, mcfg.n_heads * mcfg.head_dim, mcfg.n_kv_heads * mcfg.head_dim, mcfg.ffn_dim
    return d * (2 * hd + 2 * kd) + 3 * d * f + 2 * d


def _part_names(mode: str) -> str:
    return {"none": "attention + MLP", "full": "layer inputs", "selective": "attention + MLP inputs"}[mode]


def max_tokens_per_rank(cfg, world_size: int, device_gb: float | None = None) -> int:
    """The most tokens one rank can hold at once (the planner's max_tokens_per_rank) for `cfg` on
    `world_size` ranks within device_gb GiB (default: runtime.device_memory_gb or the detected GPU).
    0 when even the static part does not fit."""
    device = int(device_gb * GiB) if device_gb else device_bytes_for(cfg)
    if device is None:
        raise ValueError("max_tokens_per_rank: no GPU detected; pass device_gb or set runtime.device_memory_gb")
    mcfg = model_config(cfg)

    def fits(n):
        return estimate(cfg, world_size, tokens=n, device_bytes=device, mcfg=mcfg).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def what_fits(cfg, world_size: int, device_bytes: int) -> list[str]:
    """Changes to sp.degree, train.activation_checkpointing and train.engine under which `cfg` fits
    (fewest changes first, at most 3), or one line naming the longest sequence and the least memory it
    needs when nothing does."""
    import dataclasses
    import itertools

    mcfg = model_config(cfg)
    heads = (mcfg.n_heads, mcfg.n_kv_heads)
    options, best = [], None
    engines = dict.fromkeys((cfg.train.engine, "fsdp"))
    modes = dict.fromkeys((cfg.train.activation_checkpointing, "selective", "full"))
    degrees = [d for d in _divisors(world_size) if d >= cfg.sp.degree]
    for engine, mode, sp in itertools.product(engines, modes, degrees):
        if cfg.sp.strategy == "ulysses" and any(h % sp for h in heads):
            continue
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, engine=engine,
                                                                   activation_checkpointing=mode),
                                    sp=dataclasses.replace(cfg.sp, degree=sp))
        est = estimate(trial, world_size, device_bytes=device_bytes, mcfg=mcfg)
        changes = [f"{k}={v}" for k, v, old in (("sp.degree", sp, cfg.sp.degree), ("train.engine", engine,
                   cfg.train.engine), ("train.activation_checkpointing", mode, cfg.train.activation_checkpointing))
                   if v != old]
        if est.fits and changes:
            options.append((len(changes), est.peak_bytes, " ".join(f"--set {c}" for c in changes)))
        if best is None or est.peak_bytes < best[0].peak_bytes:
            best = (est, sp, engine, mode)
    if options:
        return [f"fits with: {text} (peak {peak / GiB:.2f} GB)" for _, peak, text in sorted(options)[:3]]
    est, sp, engine, mode = best
    return [f"does not fit: the longest sequence (data.seq_len_max = {cfg.data.seq_len_max} tokens) needs "
            f"{est.peak_bytes / GiB:.2f} GB per GPU at best (sp.degree={sp} of {world_size} ranks, train.engine="
            f"{engine}, checkpointing {mode}); the device has {device_bytes / GiB:.2f} GB"]


def report(cfg, world_size: int) -> tuple[str, bool]:
    """The text `--estimate-memory` prints and whether the config fits. ValueError without a device size."""
    device = device_bytes_for(cfg)
    if device is None:
        from dist.config import ConfigError

        raise ConfigError("config key 'runtime.device_memory_gb': no GPU detected to estimate against; set the "
                          "GPU's memory, e.g. --set runtime.device_memory_gb=80")
    est = estimate(cfg, world_size, device_bytes=device)
    return est.table(() if est.fits else tuple(what_fits(cfg, world_size, device))), est.fits


def check_fits(cfg, world_size: int, device_type: str, rank: int = 0) -> None:
    """Refuse before running out of memory: on a CUDA device, a ValueError naming what to change when the
    estimate exceeds the device (rank 0 logs the table first), unless runtime.ignore_memory_estimate.
    Nothing on CPU (host memory is not what this estimates)."""
    if device_type != "cuda" or cfg.runtime.ignore_memory_estimate:
        return
    device = device_bytes_for(cfg)
    est = estimate(cfg, world_size, device_bytes=device)
    if est.fits:
        return
    hints = what_fits(cfg, world_size, device)
    if rank == 0:
        import logging

        logging.getLogger("dist.memory").error("%s", est.table(tuple(hints)))
    raise ValueError(f"the memory estimate ({est.peak_bytes / GiB:.2f} GB per GPU) exceeds the device "
                     f"({device / GiB:.2f} GB): {hints[0]}; runtime.ignore_memory_estimate = true starts anyway")


# ---------------------------------------------------------------------------------------------------------------
# measuring (tests, benchmarks/check_memory.py)


class saved_activation_bytes:
    """Count the bytes autograd saves for backward inside the block (distinct storages, parameters excluded):

        with saved_activation_bytes(model) as saved:
            loss = model(ids).sum()
        saved.bytes
    """

    def __init__(self, model: torch.nn.Module | None = None):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.storages: dict[int, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def add_graph(self, output: torch.Tensor) -> None:
        """Also count tensors that custom autograd Functions keep as attributes of their context
        (e.g. all-gathered K and V), which the hooks do not see: walk the backward graph from `output`."""
        seen, stack = set(), [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                for value in vars(node).values():
                    for t in value if isinstance(value, (list, tuple)) else [value]:
                        if isinstance(t, torch.Tensor):
                            self._pack(t)
            stack.extend(fn for fn, _ in node.next_functions)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
