"""The worker pool itself: real gloo all-reduce across processes, errors surface."""
import pytest
import torch


def _allreduce(rank, world):
    import torch.distributed as dist
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


@pytest.mark.distributed
def test_pool_allreduce_and_errors(dist_pool):
    pool = dist_pool(2)
    assert pool.run(_allreduce) == [3.0, 3.0]
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        pool.run(_fail)
    assert pool.run(_allreduce) == [3.0, 3.0]  # the pool survives a failed task
