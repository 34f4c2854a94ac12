"""Model FLOPs and MFU, with the formula stated once.

Model FLOPs per trained token (forward + backward, the PaLM/Megatron convention)::

    6 * N_matmul + 12 * L * d * s

* ``N_matmul`` = parameters in matrix products (``ModelConfig.matmul_params()``: attention and
  MLP weights of every block plus the LM head; the embedding lookup and norms are not matmuls).
  Forward costs 2 FLOPs per parameter per token, backward twice that: 6 * N.
* ``12 * L * d * s``: attention scores (Q K^T) and values (P V) per token per layer are
  2 * s * d FLOPs each in forward = 4 * s * d, times 3 for forward + backward. The causal mask is
  *not* discounted (kernels skip about half of it; we count the full s x s, as Megatron-LM and
  PaLM do), so numbers are comparable with theirs.

Activation recomputation is not counted (model FLOPs, not hardware FLOPs), so checkpointing
lowers MFU, as it should. MFU = achieved model FLOP/s per GPU / peak dense bf16 FLOP/s of the GPU.
"""
from __future__ import annotations

from typing import Optional

from megatron_llama.config import ModelConfig

# Peak dense bf16 tensor-core throughput (no sparsity), TFLOP/s: NVIDIA data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs (fwd + bwd) per token: 6 * N_matmul + 12 * L * d * s."""
    return 6.0 * cfg.matmul_params() + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def peak_tflops(device_name: str) -> Optional[float]:
    """Peak bf16 TFLOP/s for a device name such as "NVIDIA H100 80GB HBM3", or None if unknown."""
    name = device_name.upper()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def model_tflops_per_gpu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, num_gpus: int) -> float:
    """Achieved model TFLOP/s per GPU for a global throughput of ``tokens_per_s``."""
    return tokens_per_s * flops_per_token(cfg, seq_len) / num_gpus / 1e12


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, num_gpus: int, peak: Optional[float]
        ) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown (CPU, other GPUs)."""
    if not peak:
        return None
    return model_tflops_per_gpu(tokens_per_s, cfg, seq_len, num_gpus) / peak
