"""Where a group's ranks are, and so which link the model charges: ranks on one node talk over the
intra-node link (NVLink, PCIe; loopback for CPU ranks), a group that spans nodes over the inter-node
one (InfiniBand, Ethernet), which is then its slowest hop and what a ring step waits for.

    from dist.sim import Cluster, LINK_PROFILES, set_cluster
    set_cluster(Cluster(8, LINK_PROFILES["nvlink-h100"], LINK_PROFILES["ib-400"]))  # 8 GPUs a node

dist.runtime sets the cluster from the config ([runtime] intra_node_link / inter_node_link) and
torchrun's ranks per node; without it "auto" assumes one node of the device's default link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .model import LINK_PROFILES, LinkProfile

# "auto" links per device type: (intra-node, inter-node)
DEFAULT_LINKS = {"cuda": ("nvlink-h100", "ib-400"), "cpu": ("gloo-loopback", "tcp-10g")}


@dataclass(frozen=True)
class Cluster:
    """ranks_per_node consecutive global ranks share a node (torchrun's LOCAL_WORLD_SIZE; None: all ranks
    on one node); intra: the link between ranks of one node; inter: the link between nodes."""

    ranks_per_node: int | None
    intra: LinkProfile
    inter: LinkProfile

    def __post_init__(self):
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1 or None, got {self.ranks_per_node!r}")

    def nodes(self, ranks: Sequence[int]) -> int:
        """How many nodes the global `ranks` span."""
        return 1 if not self.ranks_per_node else len({r // self.ranks_per_node for r in ranks})

    def link(self, ranks: Sequence[int]) -> LinkProfile:
        """The link a group of global `ranks` is charged: intra when they share a node, else inter."""
        return self.intra if self.nodes(ranks) <= 1 else self.inter


def link_named(name: str, device_type: str, inter: bool) -> LinkProfile:
    """A built-in link profile by name; "auto": the device type's default (DEFAULT_LINKS)."""
    if name == "auto":
        name = DEFAULT_LINKS.get(device_type, DEFAULT_LINKS["cpu"])[int(inter)]
    if name not in LINK_PROFILES:
        raise ValueError(f"link profile must be \"auto\" or one of {sorted(LINK_PROFILES)}, got {name!r}")
    return LINK_PROFILES[name]


def default_cluster(device_type: str = "cpu", ranks_per_node: int | None = None, intra: str = "auto",
                    inter: str = "auto") -> Cluster:
    return Cluster(ranks_per_node, link_named(intra, device_type, False), link_named(inter, device_type, True))


_configured: Cluster | None = None


def set_cluster(c: Cluster | None) -> None:
    """The cluster this process runs on (dist.runtime sets it); None: back to the default."""
    global _configured
    _configured = c


def cluster(device_type: str = "cpu") -> Cluster:
    """The configured cluster, else one node with the device type's default links."""
    return _configured or default_cluster(device_type)
