"""Process group, device and the (dp x sp) mesh, built once.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in the
environment) and as a plain single process (a one-rank gloo group on an
in-memory store), so every code path is the same.

Rank layout: rank = dp_index * sp + sp_index. Sequence-parallel groups are
runs of consecutive ranks (so an SP group stays inside a node when sp divides
the GPUs per node); data-parallel groups stride across them.

    with Runtime.start(cfg) as rt:
        rt.mesh, rt.sp_group, rt.dp_group, rt.device
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist import comm, sim

log = logging.getLogger("dist")


@dataclass(frozen=True)
class Mesh:
    """Validated data-parallel x sequence-parallel layout of `world_size` ranks."""

    world_size: int
    sp: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.sp < 1 or self.world_size % self.sp:
            raise ValueError(f"sp.degree ({self.sp}) must divide the world size ({self.world_size})")

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    def coords(self, rank: int) -> tuple[int, int]:
        """rank -> (dp_index, sp_index)."""
        return divmod(rank, self.sp)

    def sp_ranks(self, dp_index: int) -> list[int]:
        return [dp_index * self.sp + i for i in range(self.sp)]

    def dp_ranks(self, sp_index: int) -> list[int]:
        return [d * self.sp + sp_index for d in range(self.dp)]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def restart_count() -> int:
    """Which generation of workers this is under `torchrun --max-restarts` (0 for the first)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def agree_generation(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> int:
    """A number that every worker of this generation agrees on and no earlier generation used.

    TORCHELASTIC_RESTART_COUNT is per agent: with several agents (`--nnodes`),
    an agent that restarts only because another node failed keeps its count,
    so it cannot name the generation. Generations run one after another (an
    agent stops its workers before the next rendezvous completes), but a
    worker may die at any point, so keys left by earlier generations are not
    told apart by counting. Rank 0 takes the next number from a counter on the
    raw store and hands it to each rank in reply to a nonce that rank has just
    written: only the live rank 0 can answer a fresh nonce.
    """
    if world_size == 1:
        return int(store.add("dist-gen/epoch", 1)) - 1
    if rank:
        nonce = uuid.uuid4().hex
        store.set(f"dist-gen/hello/{rank}", nonce)
        gen = int(store.get(f"dist-gen/reply/{nonce}"))  # waits up to the store's timeout
        store.delete_key(f"dist-gen/reply/{nonce}")
        store.set(f"dist-gen/ack{gen}/{rank}", b"1")
        return gen
    gen = int(store.add("dist-gen/epoch", 1)) - 1
    pending, replied = set(range(1, world_size)), set()
    deadline = time.monotonic() + timeout.total_seconds()
    while pending:
        for r in sorted(pending):
            if store.check([f"dist-gen/ack{gen}/{r}"]):
                pending.discard(r)
            elif store.check([f"dist-gen/hello/{r}"]):
                nonce = store.get(f"dist-gen/hello/{r}").decode()
                if nonce not in replied:  # a stale nonce gets a reply nobody reads: harmless
                    store.set(f"dist-gen/reply/{nonce}", str(gen).encode())
                    replied.add(nonce)
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(pending)} did not join generation {gen} of the workers "
                                   f"within runtime.timeout_s ({timeout.total_seconds():.0f} s)")
            time.sleep(0.01)
    return gen


def restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> tuple[dist.Store, int]:
    """The rendezvous store for this generation of workers, and the generation's number.

    torchrun's agent store keeps the previous generation's keys, so after a
    restart `init_process_group` on the default env:// store reads stale
    addresses and gloo fails with "connectFullMesh ... Connection refused"
    (pytorch issue #167288, NCCL too). A prefix per generation (agreed by
    every worker, `agree_generation`) keeps each generation's keys apart.
    Under the elastic agent the agent hosts the TCPStore (every worker is a
    client); elsewhere rank 0 hosts it.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=(not agent and rank == 0), timeout=timeout)
    gen = agree_generation(base, rank, world_size, timeout)
    return dist.PrefixStore(f"dist-gen{gen}", base), gen


class Runtime:
    """This rank's view: rank, device, mesh and its process groups."""

    def __init__(self, *, backend: str = "auto", timeout_s: float = 300.0, sp: int = 1, threads: int = 0,
                 intra_node_link: str = "auto", inter_node_link: str = "auto"):
        self.rank = _env_int("RANK", 0)
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
        self.mesh = Mesh(self.world_size, sp)
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("runtime.backend = \"nccl\" needs CUDA, which this machine does not have")
        self.backend = backend
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // self.local_world_size))
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # what strategy "auto" charges a group: its link by where its ranks are (torchrun: LOCAL_WORLD_SIZE per node)
        sim.set_cluster(sim.default_cluster(self.device.type, self.local_world_size, intra_node_link, inter_node_link))
        self._owns_default_group = False
        self.rendezvous_at = (time.time(), 0.0)  # wall times around the process group's rendezvous
        self.generation = restart_count()  # under torchrun: the number every worker agreed on (see above)
        if not dist.is_initialized():
            if "MASTER_ADDR" in os.environ:
                store = None  # env:// as torch does it, outside torchrun's restarts
                if "TORCHELASTIC_RESTART_COUNT" in os.environ:
                    store, self.generation = restart_safe_store(self.rank, self.world_size, self.timeout)
                dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                        timeout=self.timeout, device_id=self.device if backend == "nccl" else None)
            else:  # plain `python -m dist.launch`: one rank, same code path
                if self.world_size != 1:
                    raise ValueError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun")
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=self.timeout)
            self._owns_default_group = True
        # Build every group once, in the same order on every rank.
        self.dp_index, self.sp_index = self.mesh.coords(self.rank)
        self.sp_group = self.dp_group = None
        for d in range(self.mesh.dp):  # with a twin each: ring exchanges use both directions of a link
            g, _ = comm.new_group_pair(self.mesh.sp_ranks(d), timeout=self.timeout)
            if d == self.dp_index:
                self.sp_group = g
        for s in range(self.mesh.sp):
            g = dist.new_group(self.mesh.dp_ranks(s), timeout=self.timeout)
            if s == self.sp_index:
                self.dp_group = g
        self.rendezvous_at = (self.rendezvous_at[0], time.time())

    @classmethod
    def start(cls, cfg) -> "Runtime":
        """Build from a dist.config.Config."""
        return cls(backend=cfg.runtime.backend, timeout_s=cfg.runtime.timeout_s, sp=cfg.sp.degree,
                   threads=cfg.runtime.threads, intra_node_link=cfg.runtime.intra_node_link,
                   inter_node_link=cfg.runtime.inter_node_link)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self._owns_default_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_default_group = False

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Runtime(rank={self.rank}/{self.world_size}, device={self.device}, backend={self.backend}, "
                f"dp={self.mesh.dp}, sp={self.mesh.sp})")


def setup_logging(level: str = "info", rank: int = 0) -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors."""
    lvl = getattr(logging, level.upper())
    logging.basicConfig(level=lvl if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
