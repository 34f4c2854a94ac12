"""Host memory for ``train.async_save``, checked at start-up before any rank builds a model.

An asynchronous save keeps a host copy of every shard its ranks write (megatron_llama/checkpoint/
async_save.py): per parameter the module in the run's dtype plus an fp32 master copy (ZeRO >= 1 and
bf16 keep one) and Adam's two fp32 moments, i.e. 14 bytes per parameter in bf16 with ZeRO-1, 16 in
fp32 (12 at fp32 ZeRO-0, where the module is the master). ZeRO partitions the optimizer part over
DP and the module is written once per model-parallel rank, so the ranks of one machine together hold
their share of one whole checkpoint: ``world bytes * local ranks / world size``. On CPU the training
state itself lives in host memory too and is counted once more.

Available memory is ``MemAvailable`` (/proc/meminfo), lowered to what the cgroup still allows
(v2 ``memory.max - memory.current``, v1 ``limit_in_bytes - usage_in_bytes``) when there is a limit.
The buffers must fit in 90 % of it (page-locked memory cannot be swapped or reclaimed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_llama.config import ConfigError, RunConfig

HEADROOM = 0.9
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def run_dtype(cfg: RunConfig, on_gpu: bool) -> torch.dtype:
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return torch.bfloat16 if p in ("bf16", "fp8") else torch.float32


def shard_bytes_per_rank(cfg: RunConfig, world_size: int, dtype: torch.dtype) -> int:
    """Bytes of one checkpoint divided by the world size (what a rank's buffers hold on average)."""
    params = cfg.model.num_params(cfg.parallel.tp)  # with the vocabulary padded for TP
    module = torch.empty((), dtype=dtype).element_size()
    master = 4 if (cfg.parallel.zero_stage >= 1 or dtype != torch.float32) else 0
    return params * (module + master + 8) // world_size


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) is not a number


def available_bytes() -> tuple[Optional[int], str]:
    """(bytes this process may still use, where the figure comes from); (None, "") if unknown."""
    avail, source = None, ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail, source = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    for limit_file, usage_file in ((_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
                                   (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            if avail is None or limit - usage < avail:
                avail, source = max(0, limit - usage), "the cgroup memory limit"
            break
    return avail, source


def check_async_save_memory(cfg: RunConfig, world_size: int, local_ranks: int, on_gpu: bool,
                            available: Optional[tuple[Optional[int], str]] = None) -> None:
    """Refuse ``train.async_save`` when this machine's ranks cannot hold their checkpoint buffers."""
    if not cfg.train.async_save:
        return
    avail, source = available or available_bytes()
    if avail is None:
        return
    per_rank = shard_bytes_per_rank(cfg, world_size, run_dtype(cfg, on_gpu))
    need = per_rank * local_ranks * (1 if on_gpu else 2)
    if need > HEADROOM * avail:
        gib = 2 ** 30
        state = "" if on_gpu else " (half of it the training state itself, which lives in host memory on CPU)"
        raise ConfigError(f"train.async_save=true keeps a host copy of every checkpoint shard: the {local_ranks} "
                          f"ranks on this machine need {need / gib:.1f} GiB{state}, but only {avail / gib:.1f} GiB "
                          f"is available ({source}; {int(HEADROOM * 100)}% may be used): set train.async_save=false "
                          "or spread the run over more machines")
