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
from .sequence_parallel import sync_replicated_grads
from .tp_linear import bind_tp_group

# Selective recomputation (LLaMA paper, section 2.4): keep what the matrix products
# produced, recompute the cheap element-wise work (norms, RoPE, SwiGLU) and attention.
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten._scaled_mm.default}  # the float8 GEMMs of train.precision=fp8
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


def _block_forward(block: "TransformerBlock", x: torch.Tensor, segments=None) -> torch.Tensor:
    h = x + block.attention(block.input_norm(x), segments)
    return h + block.mlp(block.post_attention_norm(h))


def _checkpointed_forward(block: "TransformerBlock", x: torch.Tensor, segments=None) -> torch.Tensor:
    """The block under its activation-checkpointing mode (training only)."""
    if block.checkpointing == "full":
        return checkpoint(_block_forward, block, x, segments, use_reentrant=False)
    if block.checkpointing == "selective":
        return checkpoint(_block_forward, block, x, segments, use_reentrant=False, context_fn=_selective_context)
    return _block_forward(block, x, segments)


# Compiled graphs are shared by every block: with dynamo's inlining of nn.Modules the
# parameters are graph inputs, so L blocks cost one compilation, not L. Inductor fuses the
# norms, residual adds, RoPE and SwiGLU around the cuBLAS matmuls and the SDPA kernel
# (H100, LLaMA-7B shape: 466 -> 536 TFLOP/s; bench/NOTES.md).
# Where the checkpoint goes, measured on an H200 (bench/results/h200-llama7b8l-recompute-*):
# * selective: checkpoint *inside* the compiled function. Outside, compiled code is opaque to
#   the eager selective policy and everything was recomputed (457 TFLOP/s, = full); inside,
#   the policy reaches the partitioner: 475 TFLOP/s, 61 GiB.
# * full: checkpoint *outside*, so the recompute replays the fused forward graph: 457 TFLOP/s
#   against 398 with the checkpoint traced into the graph.
_compiled_block = None
_compiled_checkpointed = None


def _compiled(block: "TransformerBlock", x: torch.Tensor, segments=None) -> torch.Tensor:
    global _compiled_block, _compiled_checkpointed
    if block.checkpointing == "full" and torch.is_grad_enabled():
        if _compiled_block is None:
            _compiled_block = torch.compile(_block_forward)
        return checkpoint(_compiled_block, block, x, segments, use_reentrant=False)
    if _compiled_checkpointed is None:
        _compiled_checkpointed = torch.compile(_checkpointed_forward)
    return _compiled_checkpointed(block, x, segments)


class TransformerBlock(torch.nn.Module):
    """x [s, b, d] -> x + attn(norm(x)) -> h + mlp(norm(h)), same shape ([s/tp, b, d] on each TP
    rank with sequence parallelism).

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
        bind_tp_group(self)  # one compiled graph per block (tp_linear.py)
        if mp.sequence_parallel:  # the norms see s/tp positions: sum their gradients over TP
            sync_replicated_grads(self, tp_group)

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """``segments`` [b, s]: packed samples, attention kept inside each (document_mask.py)."""
        if self.compile:
            return _compiled(self, x, segments)
        if not torch.is_grad_enabled():
            return _block_forward(self, x, segments)
        return _checkpointed_forward(self, x, segments)
