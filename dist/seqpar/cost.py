"""The planner's cost model: seconds and memory of one sequence on a sequence-parallel group.

    cm = CostModel()                      # Llama-3-8B, bf16, H100s, 8 per node, NVLink + InfiniBand, TokenRing
    cm.time(32768, 4)                     # seconds for one 32K sequence (forward + backward) on 4 ranks
    cm = CostModel.load("cost.json")      # coefficients measured by `python -m dist.seqpar.profile`

A sequence of L tokens on a group of d ranks (forward + backward of the whole model):

    time = (attn_s * L^2 + linear_s * L) / d        compute, split evenly over the group
         + layers * bytes(L / d, d) / bandwidth      the strategy's messages on the link the group spans
         + layers * 2 * (d - 1) * latency            (intra-node up to gpus_per_node ranks, else inter-node)
         + layers * 2 * d * doc_s                    per sequence: its attention calls (0 for one varlen kernel)
         + const_s (+ group_pass_s when d > 1)       per pass: kernel launches, the loss, the ring's setup

and per training step, whatever the plan, step_s (gradient all-reduce + optimizer). `python -m
dist.seqpar.profile --world N` measures doc_s, latency_s, group_pass_s and step_s on N ranks of a node.

bytes per rank come from dist.sim (the same block plan the implementation sends). Several sequences
packed into one pass of a group share one const_s and one set of latencies (`group_time`): that is
how a group runs them. Memory per rank is model state plus activations linear in L / d.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

from dist.plan import SP_STRATEGIES

H100_ATTN_FLOPS = 270e12            # FlashAttention-2-class fwd+bwd on H100 bf16 (dist.sim h100-bf16: 350/250 TF)
H100_MATMUL_FLOPS = 989e12 * 0.5    # dense bf16 peak at 50% efficiency
EXACT_DEGREE = 16                   # group sizes whose bytes dist.sim replays step by step (then linear)


@functools.lru_cache(maxsize=None)
def sim_comm(strategy: str, degree: int, heads_q: int, heads_kv: int, head_dim: int, itemsize: int,
             link: str) -> tuple[float, float, float]:
    """The one call into dist.sim: (bytes one rank sends per local token per layer, forward + backward;
    the link's rate for this strategy in bytes/s; its latency per message in s)."""
    from dist.sim import LINK_PROFILES, Workload, bytes_per_rank

    if link not in LINK_PROFILES:
        raise ValueError(f"cost model link {link!r} is not a dist.sim link profile: {sorted(LINK_PROFILES)}")
    profile = LINK_PROFILES[link]
    local = 1024  # bytes are linear in the local length; zigzag needs it even

    def sent(p: int) -> float:
        w = Workload(1, local, heads_q, heads_kv, head_dim, p, True, "zigzag", itemsize)
        return max(bytes_per_rank(strategy, w)) / local

    if degree <= EXACT_DEGREE or strategy == "ulysses":
        per_token = sent(degree)
    else:  # a ring strategy's bytes grow linearly in the group size; replaying them costs degree^3
        per_token = sent(EXACT_DEGREE) + (sent(EXACT_DEGREE) - sent(EXACT_DEGREE // 2)) * (
            degree - EXACT_DEGREE) / (EXACT_DEGREE // 2)
    rate = (profile.alltoall_Bps or profile.bandwidth_Bps) if strategy == "ulysses" else profile.bandwidth_Bps
    return per_token, rate, profile.latency_s


@functools.lru_cache(maxsize=4096)
def comm_terms(cm: "CostModel", degree: int) -> tuple[str | None, float, float]:
    """(strategy, seconds of messages per local token, seconds of latencies per pass) for a group of
    `degree` ranks under cost model `cm` (cached: the planner asks for every sequence)."""
    heads_ok = cm.heads_q % degree == 0 and cm.heads_kv % degree == 0
    if cm.strategy == "ulysses" and not heads_ok:
        return None, math.inf, math.inf
    if degree == 1:
        return ("tokenring" if cm.strategy == "auto" else cm.strategy), 0.0, 0.0
    options = [cm.strategy] if cm.strategy != "auto" else [s for s in SP_STRATEGIES if s != "ulysses" or heads_ok]
    terms = []
    for strategy in options:
        per_token, rate, latency = sim_comm(strategy, degree, cm.heads_q, cm.heads_kv, cm.head_dim, cm.itemsize,
                                            cm.link(degree))
        if cm.latency_s and degree <= cm.gpus_per_node:
            latency = cm.latency_s  # measured inside the node by `python -m dist.seqpar.profile --world N`
        terms.append((cm.n_layers * per_token / rate, cm.n_layers * 2 * (degree - 1) * latency, strategy))
    per_token_s, latency_s, strategy = min(terms)
    return strategy, per_token_s, latency_s


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the time and memory of one sequence on a group (see the module docstring).

    attn_s: seconds per token^2 on one rank (causal attention, all layers, fwd + bwd);
    linear_s: seconds per token on one rank (projections, MLP, head, norms); const_s: per pass;
    latency_s, group_pass_s: per ring message and per pass of a group of 2+ ranks, measured on a node
    (0: the link profile's latency, nothing more); step_s: per training step, outside the plan (the
    gradient all-reduce and the optimizer: `step_time` adds it); doc_s: per sequence and attention call
    (layer x ring block x forward/backward), what a packed pass pays per sequence it holds;
    strategy: the SP strategy groups run ("auto": per group size, the one with the least time on the link); heads_q/heads_kv/head_dim/n_layers/itemsize: the shapes its
    messages carry; intra_link/inter_link: dist.sim link profile names; gpus_per_node: ranks per node;
    state_bytes: model state per rank (weights, gradients, optimizer); act_bytes_per_token: activation
    bytes per token a rank holds.
    """

    attn_s: float = 7 * 32 * 128 * 32 / H100_ATTN_FLOPS          # 7 h dh L^2 flops per layer (causal fwd+bwd)
    linear_s: float = 6 * 7.5e9 / H100_MATMUL_FLOPS              # 6 flops per parameter per token
    const_s: float = 2e-3
    strategy: str = "tokenring"
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    n_layers: int = 32
    itemsize: int = 2
    intra_link: str = "nvlink-h100"
    inter_link: str = "ib-400"
    gpus_per_node: int = 8
    state_bytes: float = 16 * 8.0e9 / 8                          # AdamW mixed precision, ZeRO over 8 ranks
    act_bytes_per_token: float = 32 * 4096 * 2 * 2               # full checkpointing: layer inputs + slack
    latency_s: float = 0.0       # measured seconds per ring message inside a node (0: intra_link's latency)
    group_pass_s: float = 0.0    # measured seconds a pass on 2+ ranks costs beyond compute and messages
    step_s: float = 0.0          # measured seconds per training step whatever the plan: all-reduce + optimizer
    doc_s: float = 0.0           # measured seconds per sequence per attention call (layer, ring block, fwd/bwd)

    def __post_init__(self):
        if self.strategy not in (*SP_STRATEGIES, "auto"):
            raise ValueError(f"cost model key 'strategy' must be one of {[*SP_STRATEGIES, 'auto']}, "
                             f"got {self.strategy!r}")
        for key in ("attn_s", "linear_s", "const_s", "state_bytes", "act_bytes_per_token", "latency_s",
                    "group_pass_s", "step_s", "doc_s"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"cost model key {key!r} must be >= 0, got {getattr(self, key)!r}")
        for key in ("heads_q", "heads_kv", "head_dim", "n_layers", "itemsize", "gpus_per_node"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"cost model key {key!r} must be a positive integer, got {value!r}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"cost model key 'heads_q' ({self.heads_q}) must be a multiple of "
                             f"'heads_kv' ({self.heads_kv})")

    # ------------------------------------------------------------ time

    def supports(self, degree: int) -> bool:
        """Whether a group of `degree` ranks can run the strategy (Ulysses splits the heads)."""
        return self.strategy_for(degree) is not None

    def strategy_for(self, degree: int) -> str | None:
        """The strategy a group of `degree` ranks runs: `strategy`, or with "auto" the one whose
        messages take the least time on the link (None: Ulysses where the size does not divide the heads)."""
        return comm_terms(self, degree)[0]

    def link(self, degree: int) -> str:
        """The link an aligned group of `degree` ranks spans."""
        return self.intra_link if degree <= self.gpus_per_node else self.inter_link

    def token_time(self, seq_len: float, degree: int) -> float:
        """Seconds for one sequence on the group without the per-pass terms (compute + bytes on the link)."""
        compute = (self.attn_s * seq_len * seq_len + self.linear_s * seq_len) / degree
        calls = self.n_layers * 2 * degree  # this sequence's attention calls: per layer, ring block, direction
        return compute + comm_terms(self, degree)[1] * seq_len / degree + calls * self.doc_s

    def pass_time(self, degree: int) -> float:
        """Seconds a group's pass costs however many sequences it packs: message latencies + const_s
        (+ group_pass_s on two or more ranks)."""
        return self.const_s + (self.group_pass_s if degree > 1 else 0.0) + comm_terms(self, degree)[2]

    def time(self, seq_len: float, degree: int) -> float:
        """Seconds (forward + backward) for one sequence of `seq_len` tokens alone on `degree` ranks."""
        return self.token_time(seq_len, degree) + self.pass_time(degree)

    def step_time(self, microbatch_s: float) -> float:
        """Seconds of a training step whose plan takes `microbatch_s` (plan.predicted_step_s): + step_s."""
        return microbatch_s + self.step_s

    def group_time(self, seq_lens, degree: int) -> float:
        """Seconds for one pass of a group running `seq_lens` packed together (0 for none)."""
        if not len(seq_lens):
            return 0.0
        return sum(self.token_time(n, degree) for n in seq_lens) + self.pass_time(degree)

    # ------------------------------------------------------------ memory

    def memory_bytes(self, tokens_per_rank: float) -> float:
        """Bytes a rank holds with `tokens_per_rank` tokens (a group of d with L tokens: L / d)."""
        return self.state_bytes + self.act_bytes_per_token * tokens_per_rank

    def tokens_capacity(self, device_bytes: float) -> int:
        """max_tokens_per_rank for a device of `device_bytes` (0 when the state alone does not fit)."""
        return max(0, int((device_bytes - self.state_bytes) // max(self.act_bytes_per_token, 1e-9)))

    # ------------------------------------------------------------ files

    @classmethod
    def from_dict(cls, data: dict, source: str = "cost model") -> "CostModel":
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
        values = {}
        for key, value in data.items():
            default = getattr(cls, key)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise ValueError(f"{source}: key {key!r} expects {type(default).__name__}, got {value!r}")
            values[key] = value
        return cls(**values)

    @classmethod
    def load(cls, path) -> "CostModel":
        """A cost model from the JSON `python -m dist.seqpar.profile` writes (missing keys: defaults)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cost model file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"cost model file {path}: expected a JSON object")
        data.pop("fit", None)  # the profile's fit report rides along
        return cls.from_dict(data, f"cost model file {path}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_model(cls, model, *, attn_flops_per_s: float = H100_ATTN_FLOPS,
                  matmul_flops_per_s: float = H100_MATMUL_FLOPS, **changes) -> "CostModel":
        """Coefficients from a dist.models ModelConfig's flops at the given rates (H100 bf16 by default)."""
        hd = model.head_dim
        per_layer = (model.dim * hd * (2 * model.n_heads + 2 * model.n_kv_heads) + 3 * model.dim * model.ffn_dim)
        params = model.n_layers * per_layer + model.dim * model.vocab_size
        return cls(**{
            "attn_s": 7 * model.n_heads * hd * model.n_layers / attn_flops_per_s,
            "linear_s": 6 * params / matmul_flops_per_s,
            "heads_q": model.n_heads, "heads_kv": model.n_kv_heads, "head_dim": hd, "n_layers": model.n_layers,
            **changes})

    @classmethod
    def from_config(cls, cfg) -> "CostModel":
        """The cost model a run uses: sp.cost_model's JSON, else model.preset's flops at H100 rates with
        sp.strategy (a dist.config.Config)."""
        if cfg.sp.cost_model:
            return cls.load(cfg.sp.cost_model)
        from dist.models.llama import PRESETS

        return cls.for_model(PRESETS[cfg.model.preset], strategy=cfg.sp.strategy)
