"""Whether transformer blocks run through torch.compile (``train.compile``)."""
from __future__ import annotations

import torch

from megatron_llama.config import RunConfig


def use_compile(cfg: RunConfig, device: torch.device) -> bool:
    """``train.compile``, where None means: compiled blocks on GPU, eager on CPU (inductor's CPU
    path needs a C++ toolchain and compiles slower than tiny test models run)."""
    return cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
