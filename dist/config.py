"""The one config loader: dataclasses <- TOML file <- `--set a.b=c` overrides -> validated.

    cfg = load_config("launch/tiny.toml", ["train.steps=10", "sp.degree=2"])
    cfg.train.steps  # 10

Every user mistake (malformed TOML, unknown key, wrong type, impossible value)
raises ConfigError, a ValueError whose one-line message names the key.
Checks that need the world size (sp.degree must divide it) live in
`check_world(cfg, world_size)` and run before any process group is built.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field

from dist.plan import LAYOUTS, STRATEGY_CHOICES
from dist.sim import LINK_PROFILES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration mistake; the message names the key."""


@dataclass
class ModelConfig:
    preset: str = "tiny"          # a name in dist.models.PRESETS: tiny, llama3-8b, llama3-70b, llama3.1-8b, ...
    path: str = ""                # a local Hugging Face Llama directory to load (config.json + safetensors)
    dtype: str = "float32"        # parameter dtype: "float32" | "bfloat16" | "float16"


@dataclass
class DataConfig:
    kind: str = "synthetic"       # "synthetic" (long-tailed recall task) | "jsonl" ({"text": ...} per line)
    path: str = ""                # the JSONL file when kind = "jsonl"
    seq_len_min: int = 64         # shortest sequence drawn (synthetic)
    seq_len_max: int = 1024       # longest sequence; longer documents are cut
    tokens_per_step: int = 8192   # global batch size in tokens (all ranks together)


@dataclass
class TrainConfig:
    steps: int = 60
    lr: float = 3e-3              # peak learning rate
    min_lr_ratio: float = 0.1     # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 5
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0        # max global grad norm; 0 disables clipping
    seed: int = 0
    deterministic: bool = False   # bit-identical runs (deterministic algorithms, fixed reduction order)
    engine: str = "torch"         # "torch" (AdamW + one all-reduce) | "deepspeed" (ZeRO, dist[deepspeed]) | "fsdp"
    zero_stage: int = 2           # ZeRO stage with engine = "deepspeed": 1 (optimizer state) | 2 (+ gradients)
    # memory (docs/memory.md): what backward recomputes, "none" | "full" (whole layers) | "selective" (MLPs)
    activation_checkpointing: str = "none"


@dataclass
class SPConfig:
    degree: int = 1               # ranks per sequence-parallel group; must divide the world size
    strategy: str = "tokenring"   # "tokenring" | "ring" | "allgather" | "auto" | "ulysses"
    layout: str = "zigzag"        # "zigzag" | "contiguous"
    check_inputs: str = "once"    # cross-rank input checks of attention calls: "once" per call signature | "always"
    adaptive: bool = False        # plan each batch over SP groups of different sizes (dist.seqpar planner)
    max_tokens_per_rank: int = 0  # adaptive: tokens a rank holds at once (0: the memory estimate / the batch)
    cost_model: str = ""          # adaptive: JSON from `python -m dist.seqpar.profile` ("": model flops on H100s)
    plan_time_limit_s: float = 1.0  # adaptive: the planner's time limit per step (0: greedy only)


@dataclass
class CheckpointConfig:
    dir: str = ""                 # where step-N/ folders go; "" disables checkpoints
    every: int = 0                # save every N steps (0: only at the end, when dir is set)
    resume: str = ""              # "" (fresh start) | "latest" (newest in dir) | a step-N folder


@dataclass
class LogConfig:
    dir: str = "runs/latest"      # metrics.jsonl is written here by rank 0
    every: int = 1                # progress/metrics every N steps
    level: str = "info"           # "debug" | "info" | "warning"


@dataclass
class RuntimeConfig:
    backend: str = "auto"         # "auto" (nccl with CUDA, else gloo) | "gloo" | "nccl"
    timeout_s: float = 300.0      # collective timeout: a dead peer gives an error, not a hang
    threads: int = 0              # torch threads per rank; 0 = cores / local ranks
    # memory (docs/memory.md): the estimate checks against this many GB per device instead of the detected one
    device_memory_gb: float = 0.0
    ignore_memory_estimate: bool = False  # on CUDA, start even when the estimate exceeds the device
    # links the performance model (dist.sim, strategy "auto") charges: a dist.sim.LINK_PROFILES name
    intra_node_link: str = "auto"  # ranks of one node; "auto": nvlink-h100 on CUDA, gloo-loopback on CPU
    inter_node_link: str = "auto"  # a group spanning nodes; "auto": ib-400 on CUDA, tcp-10g on CPU


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "disaggregated"   # "disaggregated" | "colocated" (every worker prefills and decodes)
    prefill_ranks: list = field(default_factory=list)  # [] = default roles (see dist.disagg.roles)
    decode_ranks: list = field(default_factory=list)   # [] = default roles
    prefill_group: int = 1        # ranks per prefill worker; > 1: prompts run with ring attention across them
    model_name: str = ""          # the id /v1/models reports; "" = model.path's folder name or model.preset
    block_size: int = 16          # tokens per KV page
    num_blocks: int = 1024        # KV pages per worker
    max_batch: int = 32           # most requests in one worker's running batch
    chunk_tokens: int = 256       # colocated: prompt tokens prefilled per step beside the decodes
    max_model_len: int = 0        # prompt + completion tokens per request; 0 = the model's max_seq_len
    request_timeout_s: float = 60.0  # a request not finished by then gets 503 / an error event
    seed: int = 0                 # seed of the tiny model's random weights (no model.path)
    pin_cores: bool = False       # give every worker its own CPU cores (decode first); the router shares the last


@dataclass
class FaultConfig:
    snapshot_every: int = 0       # in-memory snapshot every N steps (0 = off); see dist/fault and docs/fault.md
    parity: str = "xor"           # erasure code across hosts: "xor" (1 loss per group) | "rs2" (2, zfec) | "none"
    group_size: int = 2           # hosts per parity group; must divide the number of hosts
    lease_s: float = 600.0        # a host's snapshot manager frees its memory after this long without a worker
    manager_timeout_s: float = 10.0  # a manager silent this long is hung: its host's snapshots are not loaded
    kill_step: int = 0            # fault injection for tests: SIGKILL rank kill_rank after step N (0 = off) ...
    kill_rank: int = 0            # ... in the first generation of workers only (TORCHELASTIC_RESTART_COUNT 0)
    kill_phase: str = "step"      # "step" (after the step) | "copy" (mid snapshot copy) | "host" (+ its memory)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sp: SPConfig = field(default_factory=SPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.kind": ("synthetic", "jsonl"),
    "train.engine": ("torch", "deepspeed", "fsdp"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "sp.strategy": STRATEGY_CHOICES,
    "sp.layout": LAYOUTS,
    "sp.check_inputs": ("once", "always"),
    "log.level": ("debug", "info", "warning"),
    "runtime.backend": ("auto", "gloo", "nccl"),
    "runtime.intra_node_link": ("auto", *LINK_PROFILES),
    "runtime.inter_node_link": ("auto", *LINK_PROFILES),
    "serve.mode": ("disaggregated", "colocated"),
    "fault.parity": ("xor", "rs2", "none"),
    "fault.kill_phase": ("step", "copy", "host"),
}


# ---------------------------------------------------------------- loading

def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file at `path`, then each `key=value` override; validated."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"malformed TOML in {path}: {e}") from None
        _apply_dict(cfg, raw, prefix="")
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, object]:
    """'a.b=value' -> ('a.b', value parsed as a TOML value, else the bare string)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def set_key(cfg: Config, key: str, value) -> None:
    """Set a dotted key ('train.lr') with type checking."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key must look like section.name, got {key!r}")
    section_name, name = parts
    section = _section(cfg, section_name, key)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        known = ", ".join(f"{section_name}.{n}" for n in hints)
        raise ConfigError(f"unknown config key {key!r} (known in [{section_name}]: {known})")
    setattr(section, name, _coerce(key, value, hints[name]))


def _section(cfg: Config, name: str, key: str):
    if name not in {f.name for f in dataclasses.fields(cfg)}:
        known = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"unknown config section in {key!r} (sections: {known})")
    return getattr(cfg, name)


def _apply_dict(cfg: Config, raw: dict, prefix: str) -> None:
    for section_name, body in raw.items():
        _section(cfg, section_name, section_name)
        if not isinstance(body, dict):
            raise ConfigError(f"config key {section_name!r} must be a [{section_name}] table")
        for name, value in body.items():
            set_key(cfg, f"{section_name}.{name}", value)


def _coerce(key: str, value, typ):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is list and isinstance(value, list):
        return value
    if typ in (int, float, str, bool) and type(value) is typ:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"config key {key!r} expects {name}, got {type(value).__name__} {value!r}")


# ---------------------------------------------------------------- validation

def deepspeed_available() -> bool:
    """Whether DeepSpeed is installed (found without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def validate(cfg: Config) -> None:
    """Checks that need no process group. Raises ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {list(allowed)}, got {value!r}")
    if cfg.train.zero_stage == 3:
        raise ConfigError("config key 'train.zero_stage' = 3 is not supported: stage 3 partitions the parameters, "
                          "which the Hugging Face checkpoints and sequence-parallel wrapping need whole; use 1 or 2")
    if cfg.train.zero_stage not in (1, 2):
        raise ConfigError(f"config key 'train.zero_stage' must be 1 or 2, got {cfg.train.zero_stage!r}")
    if cfg.train.engine == "deepspeed" and not deepspeed_available():
        raise ConfigError("config key 'train.engine' = \"deepspeed\" needs DeepSpeed, which is not installed: "
                          "pip install 'dist[deepspeed]'")
    positive = {
        "data.seq_len_min": cfg.data.seq_len_min, "data.seq_len_max": cfg.data.seq_len_max,
        "data.tokens_per_step": cfg.data.tokens_per_step, "train.steps": cfg.train.steps,
        "train.lr": cfg.train.lr, "sp.degree": cfg.sp.degree, "runtime.timeout_s": cfg.runtime.timeout_s,
        "log.every": cfg.log.every,
    }
    from dist.models.llama import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset' must be one of {sorted(PRESETS)}, got {cfg.model.preset!r}")
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value!r}")
    nonneg = {"train.warmup_steps": cfg.train.warmup_steps, "train.weight_decay": cfg.train.weight_decay,
              "train.grad_clip": cfg.train.grad_clip, "checkpoint.every": cfg.checkpoint.every,
              "runtime.threads": cfg.runtime.threads, "runtime.device_memory_gb": cfg.runtime.device_memory_gb,
              "sp.max_tokens_per_rank": cfg.sp.max_tokens_per_rank, "sp.plan_time_limit_s": cfg.sp.plan_time_limit_s}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value!r}")
    if cfg.data.seq_len_min < 2:
        raise ConfigError(f"config key 'data.seq_len_min' must be >= 2, got {cfg.data.seq_len_min}")
    if cfg.data.seq_len_min > cfg.data.seq_len_max:
        raise ConfigError(f"config key 'data.seq_len_min' ({cfg.data.seq_len_min}) exceeds "
                          f"'data.seq_len_max' ({cfg.data.seq_len_max})")
    if cfg.data.tokens_per_step < cfg.data.seq_len_max:
        raise ConfigError(f"config key 'data.tokens_per_step' ({cfg.data.tokens_per_step}) must be >= "
                          f"'data.seq_len_max' ({cfg.data.seq_len_max})")
    if not 0 <= cfg.train.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if len(cfg.train.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"config key 'train.betas' must be two numbers in [0, 1), got {cfg.train.betas!r}")
    if cfg.data.kind == "jsonl":
        if not cfg.data.path:
            raise ConfigError("config key 'data.path' is required when data.kind = \"jsonl\"")
        if not os.path.isfile(cfg.data.path):
            raise ConfigError(f"config key 'data.path': dataset file not found: {cfg.data.path}")
    if cfg.model.path and not os.path.isdir(cfg.model.path):
        raise ConfigError(f"config key 'model.path': model directory not found: {cfg.model.path}")
    if cfg.checkpoint.resume and cfg.checkpoint.resume != "latest" and not os.path.isdir(cfg.checkpoint.resume):
        raise ConfigError(f"config key 'checkpoint.resume': checkpoint directory not found: {cfg.checkpoint.resume}")
    if cfg.checkpoint.resume == "latest" and not cfg.checkpoint.dir:
        raise ConfigError("config key 'checkpoint.resume' = \"latest\" needs 'checkpoint.dir'")
    if not 0 < cfg.serve.port < 65536:
        raise ConfigError(f"config key 'serve.port' must be in 1..65535, got {cfg.serve.port}")
    if cfg.sp.adaptive and (cfg.sp.degree != 1 or cfg.train.engine != "torch"):
        raise ConfigError("config key 'sp.adaptive' = true plans its own groups and runs the torch engine: "
                          f"set sp.degree = 1 (got {cfg.sp.degree}) and train.engine = \"torch\" "
                          f"(got {cfg.train.engine!r})")
    if cfg.sp.cost_model and not os.path.isfile(cfg.sp.cost_model):
        raise ConfigError(f"config key 'sp.cost_model': file not found: {cfg.sp.cost_model}")
    f = cfg.fault
    if f.snapshot_every < 0 or f.kill_step < 0 or f.kill_rank < 0:
        raise ConfigError("config keys 'fault.snapshot_every', 'fault.kill_step', 'fault.kill_rank' must be >= 0")
    if f.lease_s <= 0 or f.manager_timeout_s <= 0:
        raise ConfigError(f"config keys 'fault.lease_s', 'fault.manager_timeout_s' must be > 0, got {f.lease_s!r}, "
                          f"{f.manager_timeout_s!r}")
    least = {"none": 1, "xor": 2, "rs2": 3}[f.parity]
    if f.group_size < least:
        raise ConfigError(f"config key 'fault.group_size' must be >= {least} with fault.parity = {f.parity!r}, "
                          f"got {f.group_size}")
    for key in ("block_size", "num_blocks", "max_batch", "chunk_tokens", "request_timeout_s", "prefill_group"):
        if getattr(cfg.serve, key) <= 0:
            raise ConfigError(f"config key 'serve.{key}' must be > 0, got {getattr(cfg.serve, key)!r}")
    if cfg.serve.max_model_len < 0:
        raise ConfigError(f"config key 'serve.max_model_len' must be >= 0, got {cfg.serve.max_model_len}")
    for key in ("prefill_ranks", "decode_ranks"):
        ranks = getattr(cfg.serve, key)
        if not all(type(r) is int and r >= 0 for r in ranks) or len(set(ranks)) != len(ranks):
            raise ConfigError(f"config key 'serve.{key}' must list distinct ranks >= 0, got {ranks!r}")
    heads = PRESETS[cfg.model.preset].n_heads
    if cfg.sp.strategy == "ulysses" and not cfg.model.path and heads % cfg.sp.degree:
        raise ConfigError(f"config key 'sp.strategy' = \"ulysses\" needs the model's heads ({heads}) divisible by "
                          f"sp.degree ({cfg.sp.degree}); use a ring strategy")


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run on every rank before building process groups."""
    if cfg.sp.adaptive and (world_size & (world_size - 1)):
        raise ConfigError(f"config key 'sp.adaptive' needs a power-of-two world size (the planner's groups are "
                          f"aligned powers of two), got {world_size}")
    if world_size % cfg.sp.degree:
        raise ConfigError(f"config key 'sp.degree' ({cfg.sp.degree}) must divide the world size ({world_size})")


# ---------------------------------------------------------------- printing

def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (what --print-config shows)."""
    lines = []
    for section, body in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for name, value in body.items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
