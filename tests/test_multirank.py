import pytest
import torch

from tests.multirank import run_ranks


def _allreduce(rank, world_size, x):
    import torch.distributed as dist
    t = torch.tensor([float(rank + x)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_ranks_sum():
    assert run_ranks(_allreduce, 3, 1) == [6.0, 6.0, 6.0]


def test_failure_names_rank():
    with pytest.raises(RuntimeError, match="rank 1"):
        run_ranks(_fail_on_one, 2, timeout_s=60)


def _vanish_on_one(rank, world_size):
    import os
    if rank == 1:
        os._exit(0)
    return rank


def test_rank_that_vanishes_is_reported_as_such():
    """Reported as an exit (found by polling), not as a rank that ran out of time."""
    with pytest.raises(RuntimeError, match="rank 1 exited with code 0"):
        run_ranks(_vanish_on_one, 2, timeout_s=60)
