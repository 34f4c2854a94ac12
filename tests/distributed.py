"""Persistent multi-process gloo workers for tests (real torch.distributed, no mocks).

Starting a process that imports torch, DeepSpeed and megatron-core costs seconds on a 2-core
machine, so each world size gets one pool of worker processes for the whole test session.
A task is a module-level function ``fn(rank, world_size, *args)`` (picklable by reference);
every rank runs it and the per-rank results come back in rank order. Between tasks the
workers reset megatron-core's parallel state, so each task starts from a clean layout.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size),
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    _reuse_process_groups(dist)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            out = (True, fn(rank, world_size, *args))
        except BaseException:  # noqa: BLE001 - the test process re-raises it
            out = (False, traceback.format_exc())
        finally:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
        results.put((rank, out))
    # No destroy_process_group(): it waits on peers and made pool shutdown take 30 s; the
    # process is exiting and gloo's sockets close with it.


def _reuse_process_groups(dist) -> None:
    """Make ``new_group`` return the group made earlier for the same ranks and backend.

    Every task builds a layout, and megatron-core plus DeepSpeed create ~17 gloo groups for it
    (3 threads each, never freed: ``destroy_process_group`` leaves the threads). Over the suite a
    worker gathered >1000 threads and idle workers kept both cores busy. A real run builds its
    layout once, so reusing groups across tasks changes nothing a test checks: every rank makes
    the same calls in the same order, so all ranks hit (or miss) the cache together.
    """
    made = {}
    create = dist.new_group

    def new_group(ranks=None, timeout=None, backend=None, *args, **kwargs):
        key = (tuple(sorted(ranks)) if ranks is not None else None, str(backend))
        if key not in made:
            made[key] = create(ranks, timeout, backend, *args, **kwargs)
        return made[key]

    dist.new_group = new_group


class WorkerPool:
    """``world_size`` gloo processes that run functions together."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.queues[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 600.0) -> list:
        for q in self.queues:
            q.put((fn, args))
        outs = {}
        for _ in range(self.world_size):
            rank, out = self.results.get(timeout=timeout)
            outs[rank] = out
        errors = [f"rank {r}:\n{o[1]}" for r, o in sorted(outs.items()) if not o[0]]
        if errors:
            raise RuntimeError("distributed task failed\n" + "\n".join(errors))
        return [outs[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
