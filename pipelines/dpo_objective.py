"""DPO as a loss over the LM head's vocab-parallel logits: one micro-batch of P pairs at a time.

Micro-batch contract (the preference data, shared with the reward model): ``tokens``, ``labels``,
``loss_mask`` [2P, s], rows 0..P-1 the chosen answers and P..2P-1 the rejected ones (pair i = rows
i and P+i, same micro-batch and DP rank); ``ref_logps`` [2P] float64 the reference model's
log-probs of the same rows (the stored reference pass, megatron_llama/data/reference_logps.py).

The loss of a micro-batch is ``sum over its pairs of loss_i * pair_scale`` with
``pair_scale = gas * dp / N`` (N = pairs of the global batch): after DeepSpeed's ``/ gas`` and DP
average the gradient is exactly that of the mean over the global batch's pairs, for every
TP/PP/DP layout (the same argument as SFT's token weights, pipelines/token_weights.py).

The policy's sequence log-probs are ``head.sequence_logps``: vocab-parallel cross entropy summed
over ``loss_mask`` per row, so the vocabulary is never gathered; under PP this runs on the last
stage only. Logged statistics (TRL's ``rewards/*``) are returned as sums so that ranks can add them.
"""
from __future__ import annotations

import torch

from megatron_llama.config import DPOConfig
from megatron_llama.model import sequence_logps
from megatron_llama.model.dpo_loss import dpo_loss, reward_stats

# what dpo_step_loss's statistics hold, in order (sums over pairs; pairs last)
STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "loss", "pairs")


def dpo_step_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, ref_logps: torch.Tensor,
                  cfg: DPOConfig, pair_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [s, 2P, V/tp] (this TP rank's slice); labels, loss_mask [2P, s]; ref_logps [2P].
    Returns (the micro-batch's scaled loss, a scalar to backpropagate; statistics [6] float64:
    the sums of ``STAT_NAMES`` over its pairs), the same on every TP rank."""
    policy = sequence_logps(logits, labels, loss_mask)
    terms = dpo_loss(policy, ref_logps.to(policy.device), loss_mask.sum(dim=1), cfg.beta, cfg.loss,
                     cfg.label_smoothing)
    pairs = terms["loss"].shape[0]
    stats = torch.cat([reward_stats(terms["chosen_rewards"], terms["rejected_rewards"]),
                       terms["loss"].detach().double().sum().view(1),
                       torch.tensor([float(pairs)], dtype=torch.float64, device=policy.device)])
    return terms["loss"].sum() * pair_scale, stats


def mean_stats(sums: torch.Tensor) -> dict[str, float]:
    """Summed statistics (over micro-batches and ranks) -> TRL-style means per pair."""
    pairs = max(float(sums[-1]), 1.0)
    return {name: float(v) / pairs for name, v in zip(STAT_NAMES[:-1], sums[:-1].tolist())}
