"""One pre-norm LLaMA transformer block, with its activation-checkpointing mode."""
from __future__ import annotations

import functools

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megatron_llama.config import ModelConfig

from .attention import SelfAttention
from .mlp import SwiGLUMLP
from .norm import RMSNorm

# Selective recomputation (LLaMA paper, section 2.4): keep what the matrix products
# produced, recompute the cheap element-wise work (norms, RoPE, SwiGLU) and attention.
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
# TP collectives (the row-parallel all-reduce) are saved too, never re-run in recompute.
# megatron-core all-reduces the row-parallel matmul output *in place*, and the cached mm
# output is an alias of that buffer: re-running the all-reduce on it during recompute summed
# it a second time (gradients 35% off at TP 2). Saving the collective's result also
# spares the backward pass one all-reduce per row-parallel layer.
_SAVED_NAMESPACES = {"c10d", "_c10d_functional"}


def _selective_policy(ctx, op, *args, **kwargs):
    if op in _SAVED_OPS or op.namespace in _SAVED_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_selective_context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


def _block_forward(block: "TransformerBlock", x: torch.Tensor) -> torch.Tensor:
    h = x + block.attention(block.input_norm(x))
    return h + block.mlp(block.post_attention_norm(h))


# One compiled graph shared by every block: with dynamo's inlining of nn.Modules the
# parameters are graph inputs, so L blocks cost one compilation, not L. Inductor fuses the
# norms, residual adds, RoPE and SwiGLU around the cuBLAS matmuls and the SDPA kernel
# (measured on an H100, LLaMA-7B shape: 466 -> 536 TFLOP/s; bench/NOTES.md).
_compiled_block_forward = None


def _compiled(block: "TransformerBlock", x: torch.Tensor) -> torch.Tensor:
    global _compiled_block_forward
    if _compiled_block_forward is None:
        _compiled_block_forward = torch.compile(_block_forward)
    return _compiled_block_forward(block, x)


class TransformerBlock(torch.nn.Module):
    """x [s, b, d] -> x + attn(norm(x)) -> h + mlp(norm(h)), same shape.

    ``checkpointing``: ``none`` keeps every activation; ``selective`` keeps matmul outputs
    only; ``full`` keeps only the block input and recomputes the whole block in backward.
    ``compile`` runs the block through torch.compile (GPU; see ``_compiled``).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group, checkpointing: str = "none",
                 compile: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.compile = compile
        dtype = mp.params_dtype
        device = "cpu" if mp.use_cpu_initialization else torch.cuda.current_device()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=dtype)
        self.attention = SelfAttention(cfg, mp, tp_group)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=dtype)
        self.mlp = SwiGLUMLP(cfg, mp, tp_group)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled(self, x) if self.compile else _block_forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.checkpointing == "none":
            return self._forward(x)
        if self.checkpointing == "full":
            return checkpoint(self._forward, x, use_reentrant=False)
        return checkpoint(self._forward, x, use_reentrant=False, context_fn=_selective_context)
