import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from distributed import WorkerPool  # noqa: E402

_POOLS: dict[int, WorkerPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(n)`` -> a session-wide WorkerPool of n gloo processes."""
    def get(n: int) -> WorkerPool:
        if n not in _POOLS:
            _POOLS[n] = WorkerPool(n)
        return _POOLS[n]
    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@pytest.fixture
def single_process_model_parallel():
    """A one-rank gloo world with megatron-core's parallel state (TP = PP = 1) in the test process.

    Started through ``init_method`` on a free port, so the test process's environment (MASTER_PORT,
    which subprocess-based tests inherit) stays as it was; torn down afterwards.
    """
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
