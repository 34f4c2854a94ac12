"""Forward-only passes of the model at its 3D layout, for evaluation: per-token log-likelihoods
and greedy next tokens, with the vocabulary never gathered.

Every rank of the world calls :meth:`ForwardOnly.score` with the same ``tokens`` / ``targets``
[b, s] (launch/eval_ranks.py broadcasts them from rank 0). With PP = 1 the model is run whole;
with PP > 1 each stage runs its own layers (the DeepSpeed ``PipelineModule``'s local layers, no
pipeline schedule: one micro-batch, forward only) and sends its hidden state [s, b, d] (this TP
rank's [s/tp, b, d] under sequence parallelism) to the same TP rank of the next stage. The last
stage's head gives this TP rank's logits [s, b, V_padded/tp], from which

* log p(target) = -megatron-core's ``vocab_parallel_cross_entropy`` (the training loss's
  function), fp32;
* the greedy token: each TP rank's best (logit, vocabulary id), reduced over the TP group to the
  highest logit, the smallest id on ties (``torch.argmax``'s rule). Padding rows are -inf.

The last stage broadcasts both over its pipeline group, so every rank returns them. Rows are
right-padded to a common length (causal attention: the padding changes nothing before it) and the
length is rounded up to a multiple of ``PAD_MULTIPLE`` (and of TP under sequence parallelism), so
compiled blocks see few shapes. DP replicas compute the same thing independently.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from .topology import ParallelLayout

PAD_MULTIPLE = 16


class ForwardOnly:
    """``module``: a ``LlamaModel`` (PP = 1) or this rank's stage of the ``PipelineModule``."""

    def __init__(self, module: torch.nn.Module, layout: ParallelLayout, hidden_size: int, device: torch.device,
                 sequence_parallel: bool = False):
        self.module, self.layout, self.hidden, self.device = module, layout, hidden_size, device
        self.sequence_parallel = sequence_parallel and layout.tp > 1
        self.dtype = next(module.parameters()).dtype

    def padded_length(self, s: int) -> int:
        m = PAD_MULTIPLE * (self.layout.tp if self.sequence_parallel else 1)
        return -(-s // m) * m

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, targets [b, s] int64 (the same on every rank) -> (log p(targets) [b, s] fp32,
        greedy tokens [b, s] int64) on every rank. Positions past a row's end are padding: ignore them."""
        b, s = tokens.shape
        full = self.padded_length(s)
        tokens = _pad(tokens.to(self.device), full)
        targets = _pad(targets.to(self.device), full)
        lay = self.layout
        was_training = self.module.training
        self.module.eval()
        try:
            logits = self._logits(tokens, b, full)
        finally:
            self.module.train(was_training)
        logprob = torch.empty(b, full, dtype=torch.float32, device=self.device)
        greedy = torch.empty(b, full, dtype=torch.int64, device=self.device)
        if logits is not None:
            logits = logits.float()  # [full, b, V/tp]
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), targets.t().contiguous())
            logprob.copy_(-loss.t())
            greedy.copy_(_vocab_parallel_argmax(logits, lay.tp_rank).t())
        if lay.pp > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            dist.broadcast(logprob, src=lay.pp_ranks[-1], group=group)
            dist.broadcast(greedy, src=lay.pp_ranks[-1], group=group)
        return logprob[:, :s], greedy[:, :s]

    def _logits(self, tokens: torch.Tensor, b: int, s: int):
        """This TP rank's logits [s, b, V/tp] on the last stage, None elsewhere."""
        lay = self.layout
        if lay.pp == 1:
            return self.module(tokens)
        if lay.is_first_stage:
            x = tokens
        else:
            local_s = s // lay.tp if self.sequence_parallel else s
            x = torch.empty(local_s, b, self.hidden, dtype=self.dtype, device=self.device)
            dist.recv(x, src=lay.pp_ranks[lay.pp_rank - 1])
        out = self.module(x)
        if lay.is_last_stage:
            return out
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        dist.send(hidden.contiguous(), dst=lay.pp_ranks[lay.pp_rank + 1])
        return None


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else torch.nn.functional.pad(t, (0, length - t.shape[1]))


def _vocab_parallel_argmax(logits: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """logits [s, b, V/tp] of this TP rank -> the global argmax [s, b] (smallest id among equal maxima)."""
    best, local = logits.max(dim=-1)
    index = local + tp_rank * logits.shape[-1]
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return index
    group = parallel_state.get_tensor_model_parallel_group()
    top = best.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    index = torch.where(best == top, index, torch.full_like(index, torch.iinfo(torch.int64).max))
    dist.all_reduce(index, op=dist.ReduceOp.MIN, group=group)
    return index
