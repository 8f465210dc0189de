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
    engine: str = "torch"         # "torch" (AdamW + one all-reduce) | "deepspeed" (DeepSpeed ZeRO, dist[deepspeed])
    zero_stage: int = 2           # ZeRO stage with engine = "deepspeed": 1 (optimizer state) | 2 (+ gradients)


@dataclass
class SPConfig:
    degree: int = 1               # ranks per sequence-parallel group; must divide the world size
    strategy: str = "tokenring"   # "tokenring" | "ring" | "allgather" | "auto" | "ulysses"
    layout: str = "zigzag"        # "zigzag" | "contiguous"
    check_inputs: str = "once"    # cross-rank input checks of attention calls: "once" per call signature | "always"
    # heterogeneous scattering planner (dist.seqpar.plan_scatter, docs/planner.md)
    cost_model: str = ""          # CostModel JSON (`python -m dist.seqpar.profile`); "" = from model.preset's flops
    plan_time_limit_s: float = 1.0  # planner budget per step; 0 = the greedy plan only
    max_tokens_per_rank: int = 0  # tokens one rank holds at once; 0 = the memory estimate decides


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


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "disaggregated"   # "disaggregated" | "colocated"


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


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.kind": ("synthetic", "jsonl"),
    "train.engine": ("torch", "deepspeed"),
    "sp.strategy": STRATEGY_CHOICES,
    "sp.layout": LAYOUTS,
    "sp.check_inputs": ("once", "always"),
    "log.level": ("debug", "info", "warning"),
    "runtime.backend": ("auto", "gloo", "nccl"),
    "serve.mode": ("disaggregated", "colocated"),
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
              "runtime.threads": cfg.runtime.threads}
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
    if cfg.sp.cost_model and not os.path.isfile(cfg.sp.cost_model):
        raise ConfigError(f"config key 'sp.cost_model': file not found: {cfg.sp.cost_model}")
    if cfg.sp.plan_time_limit_s < 0 or cfg.sp.max_tokens_per_rank < 0:
        key = "sp.plan_time_limit_s" if cfg.sp.plan_time_limit_s < 0 else "sp.max_tokens_per_rank"
        raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(cfg.sp, key.split('.')[1])!r}")
    heads = PRESETS[cfg.model.preset].n_heads
    if cfg.sp.strategy == "ulysses" and not cfg.model.path and heads % cfg.sp.degree:
        raise ConfigError(f"config key 'sp.strategy' = \"ulysses\" needs the model's heads ({heads}) divisible by "
                          f"sp.degree ({cfg.sp.degree}); use a ring strategy")


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run on every rank before building process groups."""
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
