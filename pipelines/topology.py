"""One 3D layout, two owners: megatron-core's ``parallel_state`` and DeepSpeed's topology.

megatron-core's TP layers all-reduce over ``parallel_state``'s tensor group; DeepSpeed's
pipeline engine sends activations along its own ``pipe`` axis and ZeRO reduces gradients over
its ``data`` axis. Both must put every rank in the same groups, or an all-reduce silently mixes
the wrong ranks. DeepSpeed orders its axes (pipe, data, model) with model fastest; megatron-core's
default order ``tp-cp-ep-dp-pp`` (context and expert parallel = 1) gives the same groups. That is
checked at start-up on every rank (:func:`check_groups_agree`), never assumed.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_llama.config import ParallelConfig


class TopologyMismatch(RuntimeError):
    """megatron-core and DeepSpeed disagree on a process group."""


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid (global ranks in the group lists)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"TP{self.tp}·PP{self.pp}·DP{self.dp} ({self.world_size} processes)"


def device_and_backend() -> tuple[torch.device, str]:
    """CUDA + NCCL when a GPU is visible, else CPU + gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(timeout_minutes: int = 30) -> tuple[torch.device, str]:
    """Start torch.distributed (and DeepSpeed's comm layer) from the launcher's environment.

    Works under ``deepspeed``, ``torchrun`` and SLURM launchers that export RANK, WORLD_SIZE,
    MASTER_ADDR/PORT and LOCAL_RANK. On CPU it also pins one intra-op thread per process
    (``deepspeed --num_gpus`` does not; without it steps are ~10x slower on small machines).
    """
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import deepspeed
    if device.type == "cpu":
        _skip_shared_memory_allreduce()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    # wraps the existing group; its CPU comm op announces itself on every rank: keep that quiet
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    return device, dist.get_backend()


def _skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op.

    Its ``TorchBackend`` JIT-compiles ``deepspeed_shm_comm`` (~20 s on a fresh machine) and every
    rank creates a 32 MiB+ POSIX shared-memory buffer (``/dev/shm/deepspeed_allreduce_buffer_*``)
    that nothing ever unlinks: each CPU run leaked world_size x 67 MB of RAM until reboot (CI and
    laptops ran out of memory). The op only serves DeepSpeed's *inference* all-reduce, which
    falls back to the process group's all_reduce when the op is absent; training never uses it.
    """
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _group_ranks(group) -> tuple[int, ...]:
    return tuple(sorted(dist.get_process_group_ranks(group)))


def build_topology(parallel: ParallelConfig, seed: int, device: torch.device):
    """Create megatron-core's groups and DeepSpeed's topology for the same TP, PP, DP.

    Returns ``(layout, topology)``. Must be called after :func:`init_distributed` on every rank.
    The config must already have been checked against the world size (``resolve_dp``).
    """
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    dp = parallel.resolve_dp(world)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        create_gloo_process_groups=False)
    if device.type == "cuda":
        # megatron-core's TP layers draw from a separate, TP-rank-offset CUDA RNG stream.
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    topo = PipeModelDataParallelTopology(num_pp=parallel.pp, num_mp=parallel.tp, num_dp=dp)
    layout = check_groups_agree(topo)
    return layout, topo


def _topo_ranks(topo, axis: str, rank: int) -> tuple[int, ...]:
    for ranks in topo.get_axis_comm_lists(axis):
        if rank in ranks:
            return tuple(sorted(ranks))
    return (rank,)  # an axis of size 1 has no comm lists


def check_groups_agree(topo) -> ParallelLayout:
    """Compare this rank's TP/PP/DP ranks and group members under megatron-core and DeepSpeed.

    Raises :class:`TopologyMismatch` naming the axis and both member lists. Every rank checks
    its own groups; a mismatch anywhere is reported by the ranks it affects.
    """
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    mine = {
        "tensor (TP)": (ps.get_tensor_model_parallel_rank(), _group_ranks(ps.get_tensor_model_parallel_group()),
                        coord.model, _topo_ranks(topo, "model", rank)),
        "pipeline (PP)": (ps.get_pipeline_model_parallel_rank(),
                          _group_ranks(ps.get_pipeline_model_parallel_group()),
                          coord.pipe, _topo_ranks(topo, "pipe", rank)),
        "data (DP)": (ps.get_data_parallel_rank(), _group_ranks(ps.get_data_parallel_group()),
                      coord.data, _topo_ranks(topo, "data", rank)),
    }
    for axis, (mc_rank, mc_group, ds_rank, ds_group) in mine.items():
        if mc_rank != ds_rank or mc_group != ds_group:
            raise TopologyMismatch(
                f"rank {rank}: {axis} groups differ: megatron-core says rank {mc_rank} of {list(mc_group)}, "
                f"DeepSpeed says rank {ds_rank} of {list(ds_group)}; an all-reduce would mix the wrong "
                "ranks. Use megatron-core's default order tp-cp-ep-dp-pp with DeepSpeed's "
                "PipeModelDataParallelTopology (axes pipe, data, model)")
    return ParallelLayout(
        rank=rank, world_size=dist.get_world_size(),
        tp=topo.get_dim("model"), pp=topo.get_dim("pipe"), dp=topo.get_dim("data"),
        tp_rank=coord.model, pp_rank=coord.pipe, dp_rank=coord.data,
        tp_ranks=mine["tensor (TP)"][3], pp_ranks=mine["pipeline (PP)"][3], dp_ranks=mine["data (DP)"][3])
