"""What the head stage optimises: one engine, several objectives (``train.objective``).

An objective is the loss the last pipeline stage (or the PP = 1 model) applies to the model's
output, plus the numbers it reports beside the loss:

* ``lm``: next-token cross entropy (pretraining, SFT with answer-token weights); output = logits.
* ``reward``: the pairwise ranking loss of a reward model (model/score_head.py); output = scores.
* ``dpo``: direct preference optimisation on the LM head's logits (pipelines/dpo_objective.py).

Pair objectives receive the preference micro-batch of ``megatron_llama/data/preference_dataset.py``:
``loss(output, (labels, loss_mask, margin, pair_index))`` where ``output`` is the head's output
for ``tokens`` [2P, s] (rows 0..P-1 chosen, P..2P-1 rejected), the same call under PP (DeepSpeed's
``loss_fn`` on the last stage) and PP = 1. ``loss`` returns the micro-batch's share of the step
loss (the engine divides by ``gas`` and DeepSpeed averages over DP, as for pretraining): every
micro-batch holds exactly P pairs, so its mean over pairs makes the step loss the mean over the
pairs of the global batch, in every layout (the token_weights.py argument with a constant count).

Metrics: ``loss`` adds float64 sums to ``self.sums`` on the head stage; after a step (or an
evaluation) every rank calls :meth:`Objective.collect`, one all-reduce over the world, which
returns ``{name: value}`` over the global batch (each value divided by the number of TP replicas
of the head stage, which all hold the same sums).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_llama.model.score_head import ranking_loss, sequence_rewards


class Objective:
    """The ``lm`` objective and the base of the others."""

    name = "lm"
    pairs = False           # micro-batches are preference pairs
    metric_names: tuple = ()
    num_sums = 0            # length of the float64 sums ``loss`` accumulates

    def __init__(self, tp: int):
        self.tp = tp
        self.sums: Optional[torch.Tensor] = None

    def loss(self, output: torch.Tensor, labels) -> torch.Tensor:
        from .stages import pipeline_loss
        return pipeline_loss(output, labels)

    def prepare(self, micro_batches: list, dp: int, dp_group) -> None:
        """Called on every rank before a step / evaluation of pair micro-batches (DPO's NLL term
        counts the global batch's chosen tokens here); nothing to do by default."""

    def _add(self, stats: torch.Tensor) -> None:
        self.sums = stats if self.sums is None else self.sums + stats

    def metrics(self, sums: torch.Tensor) -> dict:
        return {}

    def collect(self, device: torch.device) -> dict:
        """Every rank calls this after a step / evaluation: the metrics of the global batch."""
        if not self.num_sums:
            return {}
        total = torch.zeros(self.num_sums, dtype=torch.float64, device=device)
        if self.sums is not None:
            total += self.sums.to(device)
        self.sums = None
        dist.all_reduce(total)
        return self.metrics(total / self.tp)


class RewardObjective(Objective):
    """-log sigmoid(r_chosen - r_rejected - margin), mean over pairs; accuracy = share of pairs
    with r_chosen > r_rejected; reward_gap = mean(r_chosen - r_rejected)."""

    name = "reward"
    pairs = True
    metric_names = ("accuracy", "reward_gap")
    num_sums = 4            # pairs, correct, sum of gaps, sum of losses (score_head.ranking_loss)

    def loss(self, output: torch.Tensor, labels) -> torch.Tensor:
        _labels, loss_mask, margin, _pair_index = labels
        loss, stats = ranking_loss(sequence_rewards(output, loss_mask), margin)
        self._add(stats)
        return loss

    def metrics(self, sums: torch.Tensor) -> dict:
        pairs = max(float(sums[0]), 1.0)
        return {"accuracy": float(sums[1]) / pairs, "reward_gap": float(sums[2]) / pairs}


OBJECTIVES = {"lm": Objective, "reward": RewardObjective}


def objective_for(cfg, tp: int) -> Objective:
    """The objective of ``cfg.train.objective`` (config/run.py refuses the ones not built)."""
    if cfg.train.objective == "dpo":
        from .dpo_objective import DPOObjective  # it builds on Objective
        return DPOObjective(tp, cfg.dpo)
    return OBJECTIVES[cfg.train.objective](tp)
