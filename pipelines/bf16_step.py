"""DeepSpeed's BF16_Optimizer step without host syncs (deepspeed 0.19.8).

``BF16_Optimizer.step`` stops the host three times per optimizer step while the GPU still runs
the backward: the norm's NaN mask builds its fill value with ``torch.tensor(-1., device=...)``
(a pageable copy that waits for the stream), ``is_invalid_grad_norm`` reads the norm back, and
the clip tests ``clip_coef < 1`` on the host. Each time the GPU then idles while the host
launches what follows (on llama-7b-8l, H200: ~21 ms of each 0.63 s step).

This step computes the same numbers with the same kernels and leaves every decision on the
device:

* the global norm: per-gradient fp32 norms, squared, summed, summed over the model-parallel
  group, square root (DeepSpeed's ``get_global_norm_of_tensors``, without its mask);
* clipping: the gradients are multiplied by ``min(1, max_norm / (norm + 1e-6))`` (multiplying
  by exactly 1 changes nothing, so this equals DeepSpeed's "multiply only if below 1");
* a non-finite norm: the client AdamW, when fused, gets it as ``found_inf`` and leaves weights
  and moments untouched (its step counter too); ``_global_grad_norm`` reports ``inf`` as
  DeepSpeed does. The engine learns of the skip when it reads the norm after the step
  (``TrainEngine.train_step``). An unfused optimizer (CPU) cannot take ``found_inf``: there the
  check is a host read, which on the CPU costs nothing, and the skip is DeepSpeed's own.

Only the optimizer instance gets the new method, and only where it is exact: no MoE, no Muon,
L2 norm, fp32 gradient accumulation. Anything else keeps DeepSpeed's step.

At DP 1 (no pipeline) DeepSpeed's gradient "all-reduce" over one rank is skipped too
(:func:`skip_single_rank_allreduce`): it flattened the fp32 gradients, cast them to the bf16
communication dtype, reduced over a group of one and copied them back (~50 GB of memory traffic
per step on llama-7b-8l), rounding the fp32 accumulation to bf16 on the way. Without it the
optimizer reads the fp32 sums, as with ``communication_data_type: fp32`` (tested).
"""
from __future__ import annotations

import types

import torch


@torch.no_grad()
def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over ``grads`` and the model-parallel group, as an fp32 0-dim device tensor."""
    return model_parallel_norm(self, [g.detach().float().norm(2.0) for g in grads])


def model_parallel_norm(self, norms: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of per-tensor ``norms`` (fp32 0-dim each) summed over the model-parallel group of
    ``self`` (a DeepSpeed optimizer with ``mpu``), as an fp32 0-dim device tensor."""
    from deepspeed import comm as dist

    total = torch.stack(norms).pow(2.0).sum()
    if self.mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mpu.get_model_parallel_group())
    return total.pow(1.0 / 2.0)


@torch.no_grad()
def _step(self, closure=None):
    if closure is not None:
        raise NotImplementedError(f"{self.__class__} does not support closure.")
    self.overflow = False
    grads, _ = self.get_grads_for_norm()
    norm = _global_norm(self, grads)
    invalid = ~torch.isfinite(norm)
    self._global_grad_norm = torch.where(invalid, torch.full_like(norm, float("inf")), norm)
    fused = bool(self.optimizer.defaults.get("fused"))
    if not fused and bool(invalid):  # host read: unfused optimizers run on the CPU
        self.overflow = True
        self._global_grad_norm = float("inf")
        self.clear_hp_grads()
        self.clear_lp_grads()
        return
    if self.clip_grad > 0.0:
        clip_coef = self.clip_grad / (norm + 1e-6)  # DeepSpeed's expression, same rounding
        torch._foreach_mul_(self.get_grads_for_norm(for_clipping=True), clip_coef.clamp(max=1.0))
    for param_partition, grad_partition in zip(self.fp32_groups_flat_partition,
                                               self.fp32_groups_gradient_flat_partition):
        param_partition.grad = grad_partition
    if fused:
        self.optimizer.found_inf = invalid.float()  # read by torch.optim.Adam's fused kernel
    try:
        self.optimizer.step()
    finally:
        self.optimizer.__dict__.pop("found_inf", None)
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()


def make_step_sync_free(optimizer) -> bool:
    """Give DeepSpeed's BF16_Optimizer ``optimizer`` the sync-free step; returns whether it did."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if (not isinstance(optimizer, BF16_Optimizer) or optimizer.has_moe_layers
            or getattr(optimizer, "_uses_muon", False) or float(optimizer.norm_type) != 2.0
            or optimizer.grad_acc_dtype is not torch.float32):
        return False
    optimizer.step = types.MethodType(_step, optimizer)
    return True


def skip_single_rank_allreduce(engine, dp: int, pipelined: bool) -> bool:
    """Turn off DeepSpeed's gradient all-reduce where the DP group is this rank alone; returns
    whether it did. The pipeline engine reduces on its own schedule and keeps it."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if dp != 1 or pipelined or not isinstance(engine.optimizer, BF16_Optimizer):
        return False
    engine.enable_backward_allreduce = False
    return True
