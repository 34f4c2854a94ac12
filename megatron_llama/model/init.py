"""Weight initialisation that does not depend on the parallel layout.

Every parameter is drawn in full (its TP = 1 shape) from a generator seeded by the run seed
and the parameter's global name (``layers.7.mlp.down.weight``), then this rank keeps its
TP slice (``layout.shard``). A model built with any TP x PP therefore starts from exactly
the same weights, which is what makes losses comparable across layouts. A parameter marked
``tied_to = <global name>`` (the LM head's copy of a tied embedding on the last pipeline stage)
is drawn from that name, so it starts equal to the weight it copies.
"""
from __future__ import annotations

import hashlib
import math

import torch

from megatron_llama.config import ModelConfig

from .layout import shard

# Output projections get std / sqrt(2 * layers) (GPT-2 / Megatron "scaled init").
_SCALED = ("attention.proj.weight", "mlp.down.weight")


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_module(module: torch.nn.Module, prefix: str, cfg: ModelConfig, seed: int,
                      tp_rank: int, tp_size: int) -> None:
    """Initialise every parameter of ``module`` whose global name is ``prefix + "." + name``."""
    for name, param in module.named_parameters():
        if not hasattr(param, "tp_split"):
            raise RuntimeError(f"parameter {prefix}.{name} has no TP layout (layout.mark)")
        full_name = getattr(param, "tied_to", f"{prefix}.{name}")
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith("bias"):
            param.zero_()
            continue
        std = cfg.init_std
        if full_name.endswith(_SCALED):
            std = std / math.sqrt(2 * cfg.num_layers)
        gen = torch.Generator(device=param.device).manual_seed(_name_seed(seed, full_name))
        full = torch.empty(param.full_shape, dtype=torch.float32, device=param.device)
        full.normal_(0.0, std, generator=gen)
        if param.tp_split == "vocab":
            full[cfg.vocab_size:] = 0.0  # padding rows: never looked up, logits masked
        param.copy_(shard(full, param.tp_split, tp_rank, tp_size))
