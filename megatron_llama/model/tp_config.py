"""The megatron-core ModelParallelConfig our layers are built with, derived from our configs."""
from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_llama.config import ParallelConfig

from .sequence_parallel import support_cpu


def megatron_config(parallel: ParallelConfig, dtype: torch.dtype, device: torch.device
                    ) -> ModelParallelConfig:
    """A ModelParallelConfig for building layers on ``device`` in ``dtype``.

    Initialisation is ours (``init.py``: TP/PP-invariant), so megatron-core's is switched
    off. ``gradient_accumulation_fusion`` needs Megatron's own DDP ``main_grad`` buffers,
    which DeepSpeed does not provide. ``sequence_parallel`` is off at TP = 1 (nothing to split);
    on CPU it needs megatron-core's mappings made device-aware (``sequence_parallel.py``).
    """
    sequence_parallel = parallel.sequence_parallel and parallel.tp > 1
    if sequence_parallel and device.type == "cpu":
        support_cpu()
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )
