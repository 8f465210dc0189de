"""Performance model for sequence-parallel attention (bytes and step times per strategy, per link).

    from dist.sim import Workload, predict, LINK_PROFILES, COMPUTE_PROFILES, choose_strategy
    python -m dist.sim            # where each strategy wins on NVLink / PCIe / InfiniBand
"""

from dist.plan import RING_STRATEGIES

from .model import (COMPUTE_PROFILES, KERNEL_TILES, LINK_PROFILES, STRATEGIES, ComputeProfile, LinkProfile,
                    Prediction, Workload, bytes_per_rank, default_compute, format_table,
                    link_profile, load_link_profiles, predict, schedule, where_each_wins)
from .policy import choose_strategy
from .topology import Cluster, cluster, default_cluster, set_cluster

__all__ = ["LinkProfile", "ComputeProfile", "LINK_PROFILES", "COMPUTE_PROFILES", "KERNEL_TILES", "STRATEGIES", "RING_STRATEGIES",
           "Workload", "Prediction", "predict", "schedule", "bytes_per_rank", "choose_strategy", "default_compute",
           "link_profile", "load_link_profiles", "where_each_wins", "format_table",
           "Cluster", "cluster", "default_cluster", "set_cluster"]
