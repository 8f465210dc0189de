import pytest
import torch

from tests.multirank import run_ranks


def _mesh_groups(rank, world_size, sp):
    import torch.distributed as dist

    from dist.runtime import Runtime

    with Runtime(sp=sp, timeout_s=30) as rt:
        assert (rt.rank, rt.world_size) == (rank, world_size)
        assert rt.device == torch.device("cpu")
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=rt.sp_group)
        u = torch.tensor([float(rank)])
        dist.all_reduce(u, group=rt.dp_group)
        return rt.dp_index, rt.sp_index, t.item(), u.item()
    

def test_mesh_groups_on_four_ranks():
    out = run_ranks(_mesh_groups, 4, 2, init_group=False, timeout_s=90)
    # sp groups are consecutive ranks {0,1}, {2,3}; dp groups stride: {0,2}, {1,3}
    assert out == [(0, 0, 1.0, 2.0), (0, 1, 1.0, 4.0), (1, 0, 5.0, 2.0), (1, 1, 5.0, 4.0)]


def test_single_process_runtime_and_teardown():
    import torch.distributed as dist

    from dist.runtime import Runtime

    with Runtime() as rt:
        assert dist.is_initialized() and rt.world_size == 1 and rt.mesh.dp == 1
        t = torch.ones(3)
        dist.all_reduce(t, group=rt.dp_group)
        assert torch.equal(t, torch.ones(3))
    assert not dist.is_initialized()


def test_nccl_without_cuda_is_a_clear_error():
    from dist.runtime import Runtime

    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ValueError, match="nccl"):
        Runtime(backend="nccl")


def _silent_peer(rank, world_size):
    import time

    import torch.distributed as dist

    from dist.runtime import Runtime

    rt = Runtime(timeout_s=3)
    if rank == 1:  # a peer that never joins the collective
        time.sleep(12)
        return "slept"
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception:  # gloo raises on the collective timeout
        return time.monotonic() - t0
    return None


def test_silent_peer_is_an_error_not_a_hang():
    waited, other = run_ranks(_silent_peer, 2, init_group=False, timeout_s=60)
    assert other == "slept"
    assert waited is not None  # raised at the 3 s collective timeout (the harness bounds the run at 60 s)
