"""RMSNorm (LLaMA) and LayerNorm (BLOOM's embedding norm), on torch's fused kernels.

``F.rms_norm`` dispatches to a fused kernel on GPU (and is what torch.compile fuses with
neighbours); apex's FusedRMSNorm is used instead only where apex is installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import mark

try:  # optional: NVIDIA apex is not on PyPI, never a dependency
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _ApexRMSNorm = None


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim; computed in fp32."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = mark(torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype)),
                           "replicated", (dim,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast like HF's LlamaRMSNorm so bf16 runs agree with the reference within rounding.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(torch.nn.Module):
    """Plain LayerNorm with bias (BLOOM's ``word_embeddings_layernorm``)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = mark(torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype)),
                           "replicated", (dim,))
        self.bias = mark(torch.nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)),
                         "replicated", (dim,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)
