"""Causal self-attention: fused grouped QKV (column-parallel), RoPE, SDPA, row-parallel output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_llama.config import ModelConfig

from .document_mask import block_causal_mask
from .layout import mark
from .rotary import apply_rotary, rope_tables


class SelfAttention(torch.nn.Module):
    """Input/output [s, b, d] (sequence-first, as megatron-core; [s/tp, b, d] with sequence
    parallelism: the QKV layer all-gathers, the output layer reduce-scatters). Each TP rank holds
    ``num_kv_heads / tp`` whole query groups; see ``layout.py`` for the QKV row order."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.q_per_group = cfg.num_attention_heads // cfg.num_kv_heads
        self.local_groups = cfg.num_kv_heads // tp
        qkv_rows = cfg.num_kv_heads * (self.q_per_group + 2) * self.head_dim
        no_init = lambda w: w  # noqa: E731 - init.py initialises every weight
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_rows, config=mp, init_method=no_init,
                                        bias=cfg.qkv_bias, gather_output=False, tp_group=tp_group)
        self.proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                      config=mp, init_method=no_init, bias=False,
                                      input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        mark(self.qkv.weight, "rows", (qkv_rows, cfg.hidden_size))
        if cfg.qkv_bias:
            mark(self.qkv.bias, "rows", (qkv_rows,))
        mark(self.proj.weight, "cols", (cfg.hidden_size, cfg.num_attention_heads * self.head_dim))

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """``segments`` [b, s] (packed SFT samples): attention stays inside each sample
        (``document_mask.py``); None: plain causal attention."""
        qkv, _ = self.qkv(x)                                     # [s, b, g*(q+2)*h]
        s, b = qkv.shape[:2]  # x is [s/tp, b, d] under sequence parallelism; qkv is full-length
        qkv = qkv.view(s, b, self.local_groups, self.q_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)
        cos, sin = rope_tables(self.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, x.device,
                               self.cfg.rope_scaling)
        cos, sin = cos[:s, None, None, None, :].to(x.dtype), sin[:s, None, None, None, :].to(x.dtype)
        q = apply_rotary(q, cos, sin).view(s, b, -1, self.head_dim)       # [s, b, nh, h]
        k = apply_rotary(k, cos, sin).view(s, b, -1, self.head_dim)       # [s, b, g, h]
        v = v.reshape(s, b, -1, self.head_dim)
        # SDPA wants [b, heads, s, h]; the permuted views keep the last dim contiguous,
        # which is all the flash / cuDNN kernels need. GQA without repeating K/V.
        k, v, gqa = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), self.q_per_group > 1
        if segments is not None and gqa:
            # A masked SDPA cannot run flash, and the memory-efficient kernel that takes a mask
            # does not take GQA (the math fallback would keep fp32 [b, heads, s, s] scores):
            # repeat K/V instead, a copy far smaller than those scores.
            k, v, gqa = k.repeat_interleave(self.q_per_group, 1), v.repeat_interleave(self.q_per_group, 1), False
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k, v,
            attn_mask=None if segments is None else block_causal_mask(segments),
            is_causal=segments is None, enable_gqa=gqa)
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)         # [s, b, nh_local*h]
        y, _ = self.proj(out)
        return y
