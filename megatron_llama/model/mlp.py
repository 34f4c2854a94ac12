"""SwiGLU feed-forward: fused gate/up (column-parallel) and down (row-parallel) projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_llama.config import ModelConfig

from .layout import mark


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2f] (gate then up) -> [..., f] = silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLUMLP(torch.nn.Module):
    """Input/output [s, b, d]; each TP rank holds ffn_hidden/tp columns of gate and of up."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group):
        super().__init__()
        f, d = cfg.ffn_hidden_size, cfg.hidden_size
        no_init = lambda w: w  # noqa: E731 - init.py initialises every weight
        self.gate_up = ColumnParallelLinear(d, 2 * f, config=mp, init_method=no_init, bias=False,
                                            gather_output=False, tp_group=tp_group)
        self.down = RowParallelLinear(f, d, config=mp, init_method=no_init, bias=False,
                                      input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        mark(self.gate_up.weight, "gate_up", (2 * f, d))
        mark(self.down.weight, "cols", (d, f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gate_up(x)
        y, _ = self.down(swiglu(h))
        return y
