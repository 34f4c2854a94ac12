"""The DPO family of preference losses on sequence log-probabilities (TRL's definitions).

For a pair (chosen c, rejected r) with policy log-probs ``pi_c, pi_r`` and reference log-probs
``ref_c, ref_r`` (sums over the answer tokens, ``head.sequence_logps``):

* rewards (logged): ``beta * (pi_c - ref_c)`` and ``beta * (pi_r - ref_r)``;
* ``sigmoid`` (DPO): ``d = (pi_c - ref_c) - (pi_r - ref_r)``,
  loss ``-(1 - eps) * log sigma(beta d) - eps * log sigma(-beta d)``; eps = label smoothing (cDPO,
  the probability that a label is flipped; 0 is plain DPO);
* ``ipo``: the log-ratios are divided by each side's answer-token count first (TRL does this; its
  authors confirmed the IPO paper's numbers use it), ``d = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r``,
  loss ``(d - 1/(2 beta))^2``.

All tensors here are [P] (one entry per pair); the caller averages the loss over the pairs of the
global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, answer_tokens: torch.Tensor, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """policy, reference, answer_tokens: [2P] in the micro-batch order (rows 0..P-1 chosen, P..2P-1
    rejected). Returns ``loss`` [P] (differentiable through ``policy``) and the detached
    ``chosen_rewards``, ``rejected_rewards`` [P]."""
    pairs = policy.shape[0] // 2
    ratio = policy.float() - reference.float()
    chosen, rejected = ratio[:pairs], ratio[pairs:]
    if loss == "sigmoid":
        d = beta * (chosen - rejected)
        per_pair = -(1.0 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss == "ipo":
        n = answer_tokens.float().clamp(min=1.0)
        d = chosen / n[:pairs] - rejected / n[pairs:]
        per_pair = (d - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")  # DPOConfig validated it; never reached from a run
    return {"loss": per_pair, "chosen_rewards": beta * chosen.detach(), "rejected_rewards": beta * rejected.detach()}


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Sums over pairs, [4] float64: (chosen reward, rejected reward, pairs with chosen > rejected,
    margin chosen - rejected). Summed over ranks and divided by the pair count they give TRL's
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` and ``rewards/margins``."""
    c, r = chosen_rewards.double(), rejected_rewards.double()
    return torch.stack([c.sum(), r.sum(), (c > r).double().sum(), (c - r).sum()])
