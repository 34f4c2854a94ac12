"""Final RMSNorm, the vocab-parallel LM head, and the language-model loss.

Logits stay split over TP ranks ([s, b, V_padded/tp] each); the loss is megatron-core's
vocab-parallel cross entropy, so the [tokens x vocab] matrix is never gathered. Given the
labels, the head computes the loss itself over chunks of tokens (``fused_loss.py``), so the
logits never exist whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear

from megatron_llama.config import ModelConfig

from .fused_loss import linear_cross_entropy
from .layout import mark
from .norm import RMSNorm
from .sequence_parallel import sync_replicated_grads
from .tp_linear import bind_tp_group


class FinalNorm(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group=None):
        super().__init__()
        device = "cpu" if mp.use_cpu_initialization else torch.cuda.current_device()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=mp.params_dtype)
        if mp.sequence_parallel:
            sync_replicated_grads(self, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class LMHead(torch.nn.Module):
    """hidden [s, b, d] -> this rank's logits [s, b, V_padded/tp]. With sequence parallelism the
    input is this rank's [s/tp, b, d] and the column-parallel layer all-gathers the sequence.

    Logits of padding rows (ids >= the real vocab size) are set to -inf, so the softmax and
    the loss equal those of the unpadded model exactly, whatever the TP size.
    With ``tied_weight`` the embedding's weight is used (same split: ``vocab``).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group, tied_weight=None):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        vocab = cfg.padded_vocab_size(tp)
        self.tied_weight = tied_weight
        self.output = ColumnParallelLinear(cfg.hidden_size, vocab, config=mp, init_method=lambda w: w,
                                           bias=False, gather_output=False, tp_group=tp_group,
                                           skip_weight_param_allocation=tied_weight is not None)
        if tied_weight is None:
            mark(self.output.weight, "vocab", (vocab, cfg.hidden_size))
        local = vocab // tp
        rank = torch.distributed.get_rank(tp_group) if tp > 1 else 0
        first_pad = cfg.vocab_size - rank * local  # local index of the first padding row
        self.local_pad_start = first_pad if 0 <= first_pad < local else None
        if first_pad < 0:
            self.local_pad_start = 0
        self._pad_mask = None
        self.vocab_start = rank * local
        self.loss_tp_group = tp_group if tp > 1 else None  # the fused loss's all-reduces
        bind_tp_group(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` [b, s] given: the mean token loss instead of the logits, computed over
        chunks of tokens without the whole logits (not under sequence parallelism, whose
        gathered input the column-parallel layer owns: there the logits path)."""
        if labels is not None:
            if self.output.sequence_parallel:
                return lm_loss(self._logits(x), labels)
            weight = self.tied_weight() if self.tied_weight is not None else self.output.weight
            return linear_cross_entropy(x.reshape(-1, x.shape[-1]), weight, labels.transpose(0, 1).reshape(-1),
                                        self.vocab_start, self.local_pad_start, self.loss_tp_group)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.tied_weight() if self.tied_weight is not None else None
        logits, _ = self.output(x, weight=weight)
        if self.local_pad_start is not None:
            if self._pad_mask is None or self._pad_mask.device != logits.device:
                mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                mask[self.local_pad_start:] = True
                self._pad_mask = mask  # built once, not per micro-batch
            logits = logits.masked_fill(self._pad_mask, float("-inf"))
        return logits


def _local_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.transpose(0, 1).flatten())


def _weighted(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum of per-token losses [s, b] (or [s*b]) times ``loss_mask`` [b, s] (SFT, see lm_loss)."""
    return (losses.reshape(loss_mask.shape[1], -1) * loss_mask.transpose(0, 1).to(losses.dtype)).sum()


# At TP = 1 the whole vocabulary is local: one compiled kernel pair computes the loss from
# bf16 logits without materialising an fp32 copy of the [tokens x vocab] matrix (the
# vocab-parallel path makes ~10 passes over it).
_compiled_cross_entropy = None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy. logits: [s, b, V_local] (this TP rank's slice);
    labels: [b, s] int64. Computed in fp32; every TP rank returns the same scalar.

    ``loss_mask`` [b, s] float (SFT): returns ``sum(token loss * loss_mask)`` instead of the
    mean; the caller folds the answer mask and the global normalisation into it
    (pipelines/token_weights.py), so the gradient is that of the global answer-token mean."""
    global _compiled_cross_entropy
    if loss_mask is not None:
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            losses = F.cross_entropy(logits.float().flatten(0, 1), labels.transpose(0, 1).flatten(),
                                     reduction="none")
        else:
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(),
                                                                  labels.transpose(0, 1).contiguous())
        return _weighted(losses, loss_mask)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        if logits.is_cuda:
            if _compiled_cross_entropy is None:
                _compiled_cross_entropy = torch.compile(_local_cross_entropy)
            return _compiled_cross_entropy(logits, labels)
        return _local_cross_entropy(logits, labels)
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
    return losses.mean()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each row's masked labels: ``sum_t loss_mask[b, t] * log p(labels[b, t])``.

    logits: [s, b, V_local] (this TP rank's vocabulary slice); labels, loss_mask: [b, s].
    Returns [b] float32, the same on every TP rank. The per-token ``-log p`` comes from
    megatron-core's vocab-parallel cross entropy (TP > 1: max, sum of exp and the target logit are
    all-reduced over TP, the [tokens x vocab] matrix is never gathered), so the result is exact under
    any TP; gradients flow back into every rank's slice. Used by DPO (pipelines/dpo_objective.py)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.transpose(0, 1).flatten(), reduction="none")
        nll = nll.view(logits.shape[0], logits.shape[1])
    else:
        nll = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
    return -(nll * loss_mask.transpose(0, 1).to(nll.dtype)).sum(dim=0)
