"""Rotary position embeddings (RoPE), Hugging Face's "rotate half" convention, with RoPE scaling.

Inverse frequencies and the angle table are computed in fp32 (bf16 angles lose whole
positions past a few thousand tokens); cos/sin are cast to the activation dtype at use.
Scaling (``ModelConfig.rope_scaling``: linear, llama3, yarn) only changes the inverse
frequencies, plus, for yarn, one factor on cos and sin; the formulas are those of
transformers' ``modeling_rope_utils`` (the reference the parity tests compare with), done with
the same fp32 tensor operations so the tables agree to the last bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_llama.config.model import RopeScaling


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None,
                        device=None) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies [head_dim / 2] and the factor cos/sin are multiplied by."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq, 1.0
    s = scaling
    if s.type == "linear":
        return inv_freq / s.factor, 1.0
    if s.type == "llama3":
        old = s.original_max_position_embeddings
        low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    assert s.type == "yarn", s.type
    if s.attention_factor is not None:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention = _yarn_mscale(s.factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1  # transformers: 0 means the default too

    def correction_dim(rotations: float) -> float:  # the dim at which a wave turns `rotations` times
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate (divided by factor)
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention)


class RotaryEmbedding(torch.nn.Module):
    """Holds cos/sin tables of shape [max_seq_len, head_dim] (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device=None,
                 scaling: Optional[RopeScaling] = None):
        super().__init__()
        inv_freq, attention = inverse_frequencies(head_dim, theta, scaling, device)
        pos = torch.arange(max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(pos, inv_freq)            # [s, h/2]
        angles = torch.cat([angles, angles], dim=-1)    # [s, h]
        self.register_buffer("cos", angles.cos() * attention, persistent=False)
        self.register_buffer("sin", angles.sin() * attention, persistent=False)

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


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device,
                scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [max_seq_len, head_dim], built once per (shape, scaling, device) and
    shared by all blocks of a process instead of one copy per block."""
    key = (head_dim, max_seq_len, theta, scaling, str(device))
    if key not in _TABLES:
        rope = RotaryEmbedding(head_dim, max_seq_len, theta, device=device, scaling=scaling)
        _TABLES[key] = (rope.cos, rope.sin)
    return _TABLES[key]
