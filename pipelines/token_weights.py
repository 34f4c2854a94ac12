"""SFT loss normalisation: the mean over the answer tokens of the whole global batch.

DeepSpeed reduces a step's losses in two fixed ways: the engine divides every micro-batch's
loss by ``gas`` (gradient accumulation steps) before backward, and gradients are *averaged*
over the ``dp`` ranks. A per-micro-batch mean would therefore give the mean of ``gas * dp``
means, which weighs a token of a short-answer micro-batch more than one of a long-answer
micro-batch and changes with the layout. Instead every token's loss is weighted by

    w = answer_mask * gas * dp / N,     N = answer tokens of the whole global batch

and each micro-batch's loss is ``sum(token loss * w)`` (``lm_loss(..., loss_mask=w)``). After
DeepSpeed's ``/ gas`` and DP average the gradient is exactly that of ``sum(answer losses) / N``,
and so is the reported loss (DeepSpeed averages it the same way), for every TP/PP/DP layout
and micro-batching. N is one all-reduce of one number over the DP group per step; every rank
of a DP group holds the same micro-batches as its TP/PP peers, so all ranks agree on it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def weigh_answer_tokens(micro_batches: list, dp: int, dp_group, device: torch.device) -> tuple[list, int]:
    """``[(tokens, labels, answer_mask, segments)]`` (this DP rank's ``gas`` micro-batches, [b, s]
    each) -> the same with ``answer_mask`` replaced by float32 weights, and the global N."""
    local = sum(int(m[2].sum()) for m in micro_batches)
    count = torch.tensor([float(local)], dtype=torch.float64, device=device)
    if dp > 1:
        dist.all_reduce(count, group=dp_group)
    n = int(count.item())
    scale = len(micro_batches) * dp / max(n, 1)  # a step without answer tokens contributes nothing
    return [(tok, lab, mask.to(torch.float32) * scale, seg) for tok, lab, mask, seg in micro_batches], n
