"""megatron-core's TP linear layers without torch.compile graph breaks.

``RowParallelLinear.forward`` (megatron-core 0.16.1) calls its local matmul with
``tp_group=None``; the matmul then looks the group up through a deprecation
``warnings.warn``, which dynamo cannot trace. Every compiled block fell into 8 graphs
(7 breaks, measured with ``torch._dynamo.explain``): the linears' Python ran eagerly on every
call and inductor could not fuse across them. ``bind_tp_group`` hands each layer's local matmul
its own group, so a block compiles to one graph.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from .sequence_parallel import cpu_column_impl


class _GroupBound:
    """A layer's ``_forward_impl`` with ``tp_group`` defaulting to the layer's own group."""

    def __init__(self, impl, tp_group):
        self.impl, self.tp_group = impl, tp_group

    def __call__(self, *args, tp_group=None, **kwargs):
        return self.impl(*args, tp_group=self.tp_group if tp_group is None else tp_group, **kwargs)


def bind_tp_group(module: torch.nn.Module) -> int:
    """Bind the TP group into every column-/row-parallel layer under ``module``; returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and "_forward_impl" not in vars(m):
            if isinstance(m, ColumnParallelLinear) and m.sequence_parallel and m.config.use_cpu_initialization:
                m._forward_impl = cpu_column_impl(m._forward_impl, m.tp_group)  # see sequence_parallel.py
            else:
                m._forward_impl = _GroupBound(m._forward_impl, m.tp_group)
            n += 1
    return n
