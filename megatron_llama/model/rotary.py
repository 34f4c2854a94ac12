"""Rotary position embeddings (RoPE), Hugging Face's "rotate half" convention.

Inverse frequencies and the angle table are computed in fp32 (bf16 angles lose whole
positions past a few thousand tokens); cos/sin are cast to the activation dtype at use.
"""
from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    """Holds cos/sin tables of shape [max_seq_len, head_dim] (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device=None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                                    / head_dim))
        pos = torch.arange(max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(pos, inv_freq)            # [s, h/2]
        angles = torch.cat([angles, angles], dim=-1)    # [s, h]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [seq_len, 1, 1, head_dim] for [s, b, heads, head_dim] inputs."""
        return (self.cos[:seq_len, None, None, :].to(dtype),
                self.sin[:seq_len, None, None, :].to(dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, heads, head_dim]; cos/sin broadcastable to it."""
    return x * cos + _rotate_half(x) * sin


_TABLES: dict = {}


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [max_seq_len, head_dim], built once per (shape, device) and shared
    by all blocks of a process instead of one copy per block."""
    key = (head_dim, max_seq_len, theta, str(device))
    if key not in _TABLES:
        rope = RotaryEmbedding(head_dim, max_seq_len, theta, device=device)
        _TABLES[key] = (rope.cos, rope.sin)
    return _TABLES[key]
