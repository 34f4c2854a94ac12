"""Float8 GEMMs inside megatron-core's column- and row-parallel layers (``train.precision=fp8``).

Only the *local* matmul of each ``ColumnParallelLinear`` / ``RowParallelLinear`` of the
transformer blocks changes: ``convert`` points the layer's ``_forward_impl`` at
``Float8LinearImpl``, which keeps the layer's TP communication (megatron-core's own
copy/all-reduce and sequence-parallel all-gather / reduce-scatter regions, and the
row-parallel forward all-reduce that the layer does after ``_forward_impl``) and runs the
three GEMMs of a linear layer through ``torch._scaled_mm``:

    forward  y  [M, N] = x  [M, K] @ w^T        x, w   -> e4m3
    dgrad    dx [M, K] = dy [M, N] @ w          dy     -> e5m2 (tensorwise) / e4m3 (rowwise)
    wgrad    dw [N, K] = dy^T @ x

Scaling is dynamic (from the current amax, no history):
* ``tensorwise``: one fp32 scale per tensor; each operand is cast once and transposed for
  the backward GEMMs.
* ``rowwise``: one scale per row of each GEMM operand along its contraction dimension, so
  every operand is cast again along the other axis in backward (more accurate, more casts).

Parameters, gradients, optimizer states, the embedding, norms, attention and the LM head
stay bf16. Under ``torch.compile`` (the blocks' default on GPU) the amax reductions and casts
fuse with their neighbouring element-wise kernels.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)

from megatron_llama.config import ConfigError

RECIPES = ("tensorwise", "rowwise")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def check_supported(device: torch.device | None = None) -> None:
    """Raise ConfigError unless ``device`` is a CUDA GPU with float8 tensor cores (Hopper+).
    None: the device this process would train on (the current GPU, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"train.precision=fp8 needs an NVIDIA Hopper (or newer) GPU; this run is on "
                          f"{device.type}: use train.precision=bf16 (or auto)")
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"train.precision=fp8 needs compute capability >= 9.0 (Hopper); {name} has "
                          f"{cap[0]}.{cap[1]}: use train.precision=bf16")


def _cast(x: torch.Tensor, dtype: torch.dtype, dim: int | None):
    """x -> (x * scale in ``dtype``, 1/scale as fp32). ``dim`` None: one scale for the tensor;
    else one scale per slice along ``dim`` (the reduced dim is kept, size 1)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    fmax = torch.finfo(dtype).max
    scale = fmax / amax.float().clamp(min=1e-12)
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


def _mm(a: torch.Tensor, sa: torch.Tensor, b_t: torch.Tensor, sb: torch.Tensor, out_dtype) -> torch.Tensor:
    """a [M, K] @ b_t^T where b_t is [N, K] row-major: _scaled_mm wants b column-major [K, N]."""
    return torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb.t().contiguous() if sb.dim() == 2 else sb,
                            out_dtype=out_dtype)


class _Float8Matmul(torch.autograd.Function):
    """x [M, K] @ w[N, K]^T in float8, gradients for x and w in x's / w's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rowwise: bool):
        dim = -1 if rowwise else None
        xq, sx = _cast(x, E4M3, dim)               # [M, K], scale [M, 1] or []
        wq, sw = _cast(w, E4M3, dim)               # [N, K], scale [N, 1] or []
        y = _mm(xq, sx, wq, sw, x.dtype)
        ctx.rowwise = rowwise
        if rowwise:
            ctx.save_for_backward(x, w)            # re-cast along the other axis in backward
        else:
            ctx.save_for_backward(xq, sx, wq, sw)  # fp8 copies: a quarter of bf16 x's memory
        ctx.dtypes = (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_dtype, w_dtype = ctx.dtypes
        dy = dy.contiguous()
        if ctx.rowwise:
            x, w = ctx.saved_tensors
            dyq, sdy = _cast(dy, E4M3, -1)                       # rows of dy over N
            wq_t, sw_t = _cast(w.t(), E4M3, -1)                  # w^T [K, N], rows over N
            dx = _mm(dyq, sdy, wq_t.contiguous(), sw_t, x_dtype)
            dytq, sdyt = _cast(dy.t(), E4M3, -1)                 # dy^T [N, M], rows over M
            xtq, sxt = _cast(x.t(), E4M3, -1)                    # x^T [K, M], rows over M
            dw = _mm(dytq.contiguous(), sdyt, xtq.contiguous(), sxt, w_dtype)
        else:
            xq, sx, wq, sw = ctx.saved_tensors
            dyq, sdy = _cast(dy, E5M2, None)
            dx = _mm(dyq, sdy, wq.t().contiguous(), sw, x_dtype)
            dw = _mm(dyq.t().contiguous(), sdy, xq.t().contiguous(), sx, w_dtype)
        return dx, dw, None


def float8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N] with float8 GEMMs; falls back to a bf16 matmul
    when a dimension is not a multiple of 16 (the float8 tensor cores' requirement)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] % 16 or k % 16 or weight.shape[0] % 16:
        return torch.matmul(x, weight.t())
    return _Float8Matmul.apply(x2, weight, recipe == "rowwise").view(*lead, weight.shape[0])


class Float8LinearImpl:
    """Drop-in for megatron-core's ``linear_with_grad_accumulation_and_async_allreduce``
    (same keyword arguments): the same TP communication around a float8 local matmul."""

    def __init__(self, recipe: str):
        if recipe not in RECIPES:
            raise ConfigError(f"train.fp8_recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
        self.recipe = recipe

    def __call__(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                 sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None,
                 async_grad_allreduce=None, tp_group=None):
        if async_grad_allreduce is not None:
            allreduce_dgrad = async_grad_allreduce
        if sequence_parallel:       # all-gather the sequence in forward, reduce-scatter dgrad
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:       # column-parallel: identity forward, all-reduce dgrad
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        out = float8_linear(input, weight, self.recipe)
        return out if bias is None else out + bias


def convert(model: torch.nn.Module, recipe: str, skip: tuple[type, ...] = ()) -> int:
    """Give every column-/row-parallel layer of ``model`` a float8 local matmul, except layers
    inside modules of a type in ``skip`` (the LM head). Returns how many layers changed."""
    impl = Float8LinearImpl(recipe)
    skipped = {id(m) for s in model.modules() if isinstance(s, skip) for m in s.modules()}
    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and id(m) not in skipped:  # replaces tp_linear's
            m._forward_impl = impl
            n += 1
    return n
