"""Which rank does what when serving: the router, prefill workers and decode workers.

    roles = Roles.from_config(cfg.serve, world_size)
    roles.router            # 0: HTTP server, tokenizer, admission
    roles.prefill           # ranks that run prompts
    roles.decode            # ranks that generate tokens
    roles.workers           # every rank that runs a worker loop (rank 0 too when it prefills)
    roles.ring_groups       # serve.prefill_group > 1: prefill ranks in groups that run each prompt with
                            # ring attention; the first rank of a group leads, the others follow

Defaults (the Serving API contract): rank 0 routes; with N = 1 it is also the one worker; with N = 2 it also
prefills and rank 1 decodes; with N >= 3 the first half of ranks 1..N-1 prefill and the rest decode (N = 3:
prefill 1, decode 2). In "colocated" mode every worker runs both phases, so a request's prefill and decode
happen on the same rank and its KV never moves.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist.config import ConfigError


@dataclass(frozen=True)
class Roles:
    world_size: int
    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    mode: str = "disaggregated"
    router: int = 0
    prefill_group: int = 1        # ranks per prefill worker (ring attention across them)

    @property
    def ring_groups(self) -> list[tuple[int, ...]]:
        """Consecutive runs of prefill_group prefill ranks; the first of each leads (talks to router and decode)."""
        g = self.prefill_group
        return [self.prefill[i:i + g] for i in range(0, len(self.prefill), g)]

    @property
    def prefill_leaders(self) -> tuple[int, ...]:
        return tuple(group[0] for group in self.ring_groups)

    @property
    def workers(self) -> tuple[int, ...]:
        """Ranks that run a worker loop (prefill group members other than the leader only follow it)."""
        return tuple(sorted(set(self.prefill_leaders) | set(self.decode)))

    def phases(self, rank: int) -> tuple[bool, bool]:
        """(prefills, decodes) for `rank`; colocated workers do both."""
        if self.mode == "colocated":
            return (rank in self.workers, rank in self.workers)
        return (rank in self.prefill, rank in self.decode)

    @classmethod
    def from_config(cls, serve, world_size: int) -> "Roles":
        """Roles from the [serve] config section; ConfigError naming the key when they do not fit."""
        prefill, decode = list(serve.prefill_ranks), list(serve.decode_ranks)
        rest = list(range(1, world_size))
        if not prefill and not decode:
            if world_size == 1:
                prefill, decode = [0], [0]
            elif world_size == 2:
                prefill, decode = [0], [1]
            else:
                half = max(1, len(rest) // 2)
                prefill, decode = rest[:half], rest[half:]
        for key, ranks in (("serve.prefill_ranks", prefill), ("serve.decode_ranks", decode)):
            if not ranks:
                raise ConfigError(f"config key '{key}' is empty: give both serve.prefill_ranks and "
                                  f"serve.decode_ranks, or neither for the defaults")
            bad = [r for r in ranks if not 0 <= r < world_size]
            if bad:
                raise ConfigError(f"config key '{key}' names ranks {bad} outside the world of {world_size} "
                                  f"ranks (0..{world_size - 1})")
        both = sorted(set(prefill) & set(decode))
        if both and serve.mode == "disaggregated" and world_size > 1:
            raise ConfigError(f"config key 'serve.decode_ranks' shares ranks {both} with serve.prefill_ranks; "
                              f"use serve.mode = \"colocated\" for workers that run both phases")
        idle = [r for r in rest if r not in prefill and r not in decode]
        if idle:
            raise ConfigError(f"config key 'serve.prefill_ranks' / 'serve.decode_ranks': ranks {idle} have no "
                              f"role; list every rank but the router in one of them")
        g = serve.prefill_group
        if g > 1 and (serve.mode == "colocated" or len(prefill) % g or 0 in prefill):
            raise ConfigError(f"config key 'serve.prefill_group' ({g}) needs serve.mode = \"disaggregated\" and a "
                              f"multiple of {g} prefill ranks without rank 0, got {sorted(prefill)}")
        return cls(world_size, tuple(sorted(prefill)), tuple(sorted(decode)), serve.mode, prefill_group=g)
