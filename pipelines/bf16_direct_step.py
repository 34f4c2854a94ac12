"""BF16_Optimizer at ``grad_accum_steps = 1`` and DP 1 without its fp32 gradient buffer (deepspeed 0.19.8).

With one micro-batch per step there is nothing to accumulate: DeepSpeed's fp32 buffer would
hold ``0 + bf16 gradient`` exactly. This step leaves the bf16 gradients where autograd put them
and lets the client AdamW read them (``pipelines/fused_adamw.py``):

* the buffer's storage is released at install (4 bytes per parameter: 6.5 GiB on llama-7b-8l),
  so are its accumulation, zeroing and clip passes;
* the global norm is one multi-tensor kernel over the bf16 gradients (``torch._foreach_norm``
  in fp32), summed over the model-parallel group, counting TP-replicated parameters once, as
  DeepSpeed's ``get_grads_for_norm``;
* the clip coefficient ``min(1, max / (norm + 1e-6))`` and the non-finite check stay on the
  device and go into the update (``grad_coef``, ``found_inf``), which also writes the bf16
  weights: no separate fp32 -> bf16 copy;
* the bf16 gradients are freed by DeepSpeed's ``zero_grad`` right after the step, as before.

Same numbers as the sync-free step (``bf16_step.py``) with ``communication_data_type: fp32``:
bitwise on CPU (tests/test_bf16_direct_step.py); on CUDA the update is a Triton kernel whose
rounding differs from torch's fused AdamW by a few ulps (bench/adamw_check.py).

Installed only where exact: the sync-free step is installed, the gradient all-reduce over the
one DP rank is skipped, every group's DP partition is the whole group, no pipeline, no
immediate_grad_update, and the client optimizer is :class:`pipelines.fused_adamw.AdamW`.
"""
from __future__ import annotations

import types

import torch


@torch.no_grad()
def _mark_grad(self, lp, group_idx, param_idx, clear_lp_grads):
    """Called per parameter after the backward: nothing to accumulate, only record it has a gradient."""
    if lp.grad is not None:
        self.fp32_groups_has_gradients[group_idx][param_idx] = True


def _clear_flags(self):
    for i, group in enumerate(self.fp32_groups_gradients):
        self.fp32_groups_has_gradients[i] = [False] * len(group)


def _grads_for_norm(self) -> list[torch.Tensor]:
    """The bf16 gradients DeepSpeed's ``get_grads_for_norm`` would pick (its fp32 twins)."""
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    tp_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu)
    out = []
    for i, group in enumerate(self.bf16_groups):
        for j, lp in enumerate(group):
            if hasattr(lp, PIPE_REPLICATED) and lp.ds_pipe_replicated:
                continue
            if not (tp_rank == 0 or is_model_parallel_parameter(lp)):
                continue
            if self.fp32_groups_has_gradients[i][j]:
                out.append(lp.grad)
    return out


@torch.no_grad()
def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of ``grads`` (bf16) over the model-parallel group, fp32 0-dim, one norm kernel."""
    from .bf16_step import model_parallel_norm

    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32) if grads else [torch.zeros(())]
    return model_parallel_norm(self, list(norms))


@torch.no_grad()
def _step(self, closure=None):
    if closure is not None:
        raise NotImplementedError(f"{self.__class__} does not support closure.")
    self.overflow = False
    norm = _global_norm(self, _grads_for_norm(self))
    invalid = ~torch.isfinite(norm)
    self._global_grad_norm = torch.where(invalid, torch.full_like(norm, float("inf")), norm)
    on_device = norm.is_cuda
    if not on_device and bool(invalid):  # host read: on the CPU it costs nothing
        self.overflow = True
        self._global_grad_norm = float("inf")
        return  # the engine's zero_grad frees the bf16 gradients
    coef = (self.clip_grad / (norm + 1e-6)).clamp(max=1.0) if self.clip_grad > 0.0 else torch.ones_like(norm)
    opt = self.optimizer
    opt.bf16_grads = [list(zip(group, self._direct_offsets[i])) for i, group in enumerate(self.bf16_groups)]
    opt.grad_coef = coef
    if on_device:
        opt.found_inf = invalid.float()
    try:
        opt.step()  # the trainer's step gate and LambdaLR wrap this (pipelines/engine.py)
    finally:
        for key in ("bf16_grads", "grad_coef", "found_inf"):
            opt.__dict__.pop(key, None)
    self._lazy_init_hp_params_optimizer_state()
    # the update wrote the bf16 weights; with one DP rank there is nothing to gather


_CHECKED: dict = {}


def _kernel_checked(device) -> bool:
    """The Triton update equals torch's fused AdamW on this device (once per process); else one warning."""
    if device not in _CHECKED:
        from .fused_adamw_selfcheck import check
        result = check(device)
        _CHECKED[device] = bool(result["ok"])
        if not result["ok"]:
            import sys
            print(f"warning: the fused bf16 AdamW kernel disagrees with torch's fused AdamW on {device} "
                  f"({ {k: v for k, v in result.items() if k != 'ok'} }): using DeepSpeed's step with the fp32 "
                  "gradient buffer instead", file=sys.stderr, flush=True)
    return _CHECKED[device]


def make_step_direct(bf16_optimizer, engine, grad_accum_steps: int, pipelined: bool, sync_free: bool) -> bool:
    """Give ``bf16_optimizer`` the buffer-free step where it is exact (module docstring); returns whether it did."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from . import fused_adamw
    from .fused_adamw import unsupported

    if (not isinstance(bf16_optimizer, BF16_Optimizer) or not sync_free or pipelined or grad_accum_steps != 1
            or engine.enable_backward_allreduce or bf16_optimizer.immediate_grad_update
            or any(c != 1 for c in bf16_optimizer.partition_count)
            or unsupported(bf16_optimizer.optimizer) is not None):
        return False
    on_cuda = bf16_optimizer.fp32_groups_flat_partition[0].is_cuda
    if on_cuda and fused_adamw.triton is None:  # the CUDA path needs the kernel (found_inf on the device)
        return False
    if on_cuda and not _kernel_checked(bf16_optimizer.fp32_groups_flat_partition[0].device):
        return False
    offsets = []
    for group in bf16_optimizer.bf16_groups:
        starts, at = [], 0
        for lp in group:
            starts.append(at)
            at += lp.numel()
        offsets.append(starts)
    bf16_optimizer._direct_offsets = offsets
    for flat in bf16_optimizer.fp32_groups_gradients_flat:
        flat.untyped_storage().resize_(0)  # every view of the buffer shares this storage: all freed
    bf16_optimizer._update_hp_grad = types.MethodType(_mark_grad, bf16_optimizer)
    bf16_optimizer.clear_hp_grads = types.MethodType(_clear_flags, bf16_optimizer)
    bf16_optimizer.step = types.MethodType(_step, bf16_optimizer)
    return True
