"""torch's AdamW, plus one update that reads bf16 gradients and writes the bf16 weights too.

:class:`AdamW` is ``torch.optim.AdamW`` (same state, same checkpoints). Its ``step`` behaves as
torch's unless the caller has set ``bf16_grads`` for this step (``pipelines/bf16_direct_step.py``
does at ``grad_accum_steps = 1``): then each fp32 master partition is updated from the bf16
gradients of the parameters that live in it, in one pass per parameter that

* promotes the bf16 gradient to fp32 and multiplies it by the clip coefficient ``grad_coef``
  (a 0-dim fp32 device tensor: the clip folded into the update, no pass over the gradients),
* applies decoupled weight decay, the moment updates and the bias-corrected step, and
* writes the updated master back and its bf16 copy into the model's parameter.

Per element it reads 14 bytes (bf16 gradient, fp32 master, two fp32 moments) and writes 14:
on llama-7b-8l (1.75 B parameters) ~49 GB, against ~100 GB for torch's fused AdamW on an fp32
gradient buffer plus the buffer's accumulation, clip, zeroing and the fp32 -> bf16 copy.

On CUDA the pass is a Triton kernel; ``found_inf`` (a 0-dim fp32 device tensor) makes it write
nothing and leaves the step counter alone, as torch's fused AdamW does. Elsewhere (CPU) the same
maths runs as torch's single-tensor AdamW operations in the same order, so the result is
bitwise torch's AdamW on ``grad.float() * grad_coef``; there a non-finite norm is the caller's
host check.

Shapes: ``bf16_grads[g]`` lists ``(param, offset)`` for group ``g``: ``param`` (bf16, any shape)
is a view of the flat bf16 buffer whose fp32 copy is the group's only parameter (``[n]``);
``offset`` is where ``param`` starts in it. A ``param.grad`` of None counts as zeros.
"""
from __future__ import annotations

import torch

try:  # the CUDA kernel; CPU-only installs (and tests) run the reference below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048


if triton is not None:
    @triton.jit
    def _adamw_bf16_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, scalars_ptr, n,
                           decay, beta1, beta2, eps, BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        step_size = tl.load(scalars_ptr)       # lr / (1 - beta1^t)
        bc2_sqrt = tl.load(scalars_ptr + 1)    # sqrt(1 - beta2^t)
        coef = tl.load(scalars_ptr + 2)        # clip coefficient, <= 1
        skip = tl.load(scalars_ptr + 3)        # 1.0: non-finite norm, write nothing
        mask = (offs < n) & (skip == 0.0)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        tl.store(out_ptr + offs, p.to(tl.bfloat16), mask=mask)


def _init_state(opt: torch.optim.AdamW, group: dict, master: torch.Tensor) -> dict:
    """torch's lazy AdamW state, created the way torch creates it (checkpoints stay the same)."""
    state = opt.state[master]
    if not state:
        on_device = group["fused"] or group["capturable"]
        state["step"] = (torch.zeros((), dtype=torch.float32, device=master.device) if on_device
                         else torch.tensor(0.0, dtype=torch.float32))
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def _reference(master, grad, exp_avg, exp_avg_sq, out, coef, lr, wd, beta1, beta2, eps, step):
    """torch's single-tensor AdamW on ``grad.float() * coef``, then the bf16 copy."""
    g = grad.float().mul_(coef)
    if wd != 0:
        master.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
    out.copy_(master)


def _device_scalars(step_t: torch.Tensor, lr: float, beta1: float, beta2: float,
                    coef: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """[lr / bc1, sqrt(bc2), coef, skip] as fp32 on the device, from the device step counter."""
    t = step_t.double()
    bc1 = 1 - torch.pow(beta1, t)
    bc2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    return torch.stack([lr / bc1, bc2_sqrt, coef.double(), skip.double()]).float()


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``; a step with ``bf16_grads`` set reads bf16 gradients (module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        layout = self.__dict__.get("bf16_grads")
        if layout is None:
            return super().step(closure)
        if closure is not None:
            raise NotImplementedError("AdamW from bf16 gradients takes no closure")
        coef = self.__dict__["grad_coef"]
        found_inf = self.__dict__.get("found_inf")
        for group, members in zip(self.param_groups, layout):
            (master,) = group["params"]
            state = _init_state(self, group, master)
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            beta1, beta2 = (float(b) for b in group["betas"])
            step_t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            if master.is_cuda and triton is not None:
                skip = found_inf if found_inf is not None else torch.zeros((), device=master.device)
                step_t.add_(1 - skip.to(step_t.dtype))
                scalars = _device_scalars(step_t, lr, beta1, beta2, coef, skip)
                for param, offset in members:
                    n = param.numel()
                    grad = param.grad.contiguous() if param.grad is not None else torch.zeros_like(param)
                    _adamw_bf16_kernel[(triton.cdiv(n, BLOCK),)](
                        master[offset:offset + n], grad, m[offset:offset + n], v[offset:offset + n], param,
                        scalars, n, 1.0 - lr * wd, beta1, beta2, eps, BLOCK_SIZE=BLOCK, num_warps=8)
            else:
                step_t += 1
                step = step_t.item()
                for param, offset in members:
                    n = param.numel()
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    _reference(master[offset:offset + n], grad.view(-1), m[offset:offset + n],
                               v[offset:offset + n], param.data.view(-1), coef, lr, wd, beta1, beta2, eps, step)
        return None


def unsupported(opt: torch.optim.Optimizer) -> str | None:
    """Why ``opt`` cannot take bf16 gradients (None if it can)."""
    if not isinstance(opt, AdamW):
        return "the client optimizer is not pipelines.fused_adamw.AdamW"
    for group in opt.param_groups:
        if group["amsgrad"] or group["maximize"] or group.get("differentiable") or len(group["params"]) != 1:
            return "amsgrad / maximize / differentiable / more than one tensor per group"
        if torch.is_tensor(group["lr"]):
            return "a tensor learning rate"
    return None
