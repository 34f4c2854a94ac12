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
