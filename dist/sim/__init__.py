"""Performance model for sequence-parallel attention (bytes and step times per strategy, per link).

    from dist.sim import LinkProfile, load_link_profiles, LINK_PROFILES, Workload, predict
    python -m dist.sim            # where each strategy wins on NVLink / PCIe / InfiniBand
"""

from .model import (COMPUTE_PROFILES, LINK_PROFILES, RING_STRATEGIES, STRATEGIES, ComputeProfile, LinkProfile,
                    Prediction, Workload, bytes_per_rank, choose_strategy, default_link, format_table,
                    link_profile, load_link_profiles, predict, schedule, where_each_wins)

__all__ = ["LinkProfile", "ComputeProfile", "LINK_PROFILES", "COMPUTE_PROFILES", "STRATEGIES", "RING_STRATEGIES",
           "Workload", "Prediction", "predict", "schedule", "bytes_per_rank", "choose_strategy", "default_link",
           "link_profile", "load_link_profiles", "where_each_wins", "format_table"]
