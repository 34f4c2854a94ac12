"""Sequence parallelism (``parallel.sequence_parallel``): the TP-replicated regions split along the sequence.

Between the TP regions (norms, residual adds, the pipeline's stage-to-stage activations) every
TP rank holds ``[s/tp, b, d]``, its own slice of the sequence, instead of a full replica:

* embedding -> :func:`scatter_to_sequence` (each rank keeps its slice; backward all-gathers);
* column-parallel linears (QKV, gate/up, LM head) all-gather the sequence on the way in, and
  reduce-scatter the input gradient (megatron-core, ``config.sequence_parallel``);
* row-parallel linears (attention output, down) reduce-scatter their output instead of
  all-reducing it (megatron-core).

Parameters that are replicated over TP but now see only ``s/tp`` positions (RMSNorm weights, the
embedding LayerNorm) get partial gradients: :func:`sync_replicated_grads` marks them
``sequence_parallel = True`` and sums their gradient over the TP group as autograd produces it
(a hook on the parameter, which runs before the gradient is accumulated into ``.grad``). That
works the same under both DeepSpeed engines, every ZeRO stage, ``overlap_comm`` and gradient
accumulation, since whatever DeepSpeed does with ``.grad`` afterwards already sees the sum; cost:
one all-reduce of ``d`` elements per norm per micro-batch.

CPU (gloo): megatron-core 0.16.1 allocates its sequence-parallel communication buffers with
``torch.cuda.current_device()``. :func:`support_cpu` replaces the two allocating helpers of
``megatron.core.tensor_parallel.mappings`` by device-aware equivalents built on all-reduce
(same sums; see ``_reduce_scatter_along_first_dim`` for why not gloo's own ops), and
the column-parallel linears on CPU all-gather through those mappings before a plain local matmul
(:func:`cpu_column_impl`), because megatron-core's fused column path also allocates its
reduce-scatter output on CUDA. On GPU nothing is replaced: megatron-core's own path runs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    scatter_to_sequence_parallel_region)

scatter_to_sequence = scatter_to_sequence_parallel_region  # [s, b, d] -> this rank's [s/tp, b, d]


def sync_replicated_grads(module: torch.nn.Module, tp_group) -> int:
    """Mark every TP-replicated parameter under ``module`` ``sequence_parallel`` and sum its
    gradient over ``tp_group`` in backward. Returns how many parameters were marked."""
    n = 0
    for p in module.parameters():
        if getattr(p, "tp_split", None) == "replicated" and not getattr(p, "sequence_parallel", False):
            p.sequence_parallel = True
            p.register_hook(lambda g, group=tp_group: _summed(g, group))
            n += 1
    return n


def _summed(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()  # autograd may still hold the incoming tensor elsewhere
    dist.all_reduce(grad, group=group)
    return grad


# --- CPU: megatron-core's sequence-parallel mappings without the CUDA allocations ------------------
_original = {}


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    if group.size() == 1:
        return input_
    if output_split_sizes is not None or input_.is_cuda:
        return _original["gather"](input_, group, output_split_sizes, use_global_buffer)
    # An all-reduce of zero-padded slices (exact: x + 0), for the reason given below.
    out = input_.new_zeros((input_.shape[0] * group.size(), *input_.shape[1:]))
    out.chunk(group.size())[group.rank()].copy_(input_)
    return funcol.all_reduce(out, "sum", group)


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    if group.size() == 1:
        return input_
    if input_split_sizes is not None or input_.is_cuda:
        return _original["reduce_scatter"](input_, group, input_split_sizes, use_global_buffer)
    assert input_.shape[0] % group.size() == 0, "sequence length must be divisible by TP"
    # An out-of-place (functional) all-reduce and this rank's slice, not gloo's
    # reduce_scatter_tensor (nor, above, all_gather_into_tensor): gloo fills those ops' outputs
    # inside its async work, after selective checkpointing has cached them; the recompute got a
    # "mutated" tensor (the reduce-scatter) or uninitialised memory (the all-gather: weight
    # gradients of 1e19). An in-place all-reduce fails differently: the recompute returns the
    # cached result but the code goes on with its fresh, unreduced buffer. A functional
    # collective returns a new tensor, which the policy saves and the recompute hands back.
    # More bytes move than with a reduce-scatter, which does not matter on CPU.
    return funcol.all_reduce(input_, "sum", group).chunk(group.size())[group.rank()]


def support_cpu() -> None:
    """Make megatron-core's sequence-parallel mappings allocate on their input's device (idempotent;
    CUDA tensors still take megatron-core's own code)."""
    if _original:
        return
    _original["gather"] = mappings._gather_along_first_dim
    _original["reduce_scatter"] = mappings._reduce_scatter_along_first_dim
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


class cpu_column_impl:
    """A column-parallel linear's ``_forward_impl`` on CPU with sequence parallelism: all-gather the
    [s/tp, b, d] input (backward: reduce-scatter its gradient), then megatron-core's local matmul."""

    def __init__(self, impl, tp_group):
        self.impl, self.tp_group = impl, tp_group

    def __call__(self, input, *args, sequence_parallel=False, tp_group=None, **kwargs):
        group = self.tp_group if tp_group is None else tp_group
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        return self.impl(input, *args, sequence_parallel=False, tp_group=group, **kwargs)
