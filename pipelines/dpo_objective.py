"""DPO as a loss over the LM head's vocab-parallel logits: one micro-batch of P pairs at a time.

Micro-batch contract (the preference data, shared with the reward model): ``tokens``, ``labels``,
``loss_mask`` [2P, s], rows 0..P-1 the chosen answers and P..2P-1 the rejected ones (pair i = rows
i and P+i, same micro-batch and DP rank); ``ref_logps`` [2P] float64 the reference model's
log-probs of the same rows (the stored reference pass, megatron_llama/data/reference_logps.py).

The loss of a micro-batch is ``sum over its pairs of loss_i * pair_scale`` with
``pair_scale = gas * dp / N`` (N = pairs of the global batch): after DeepSpeed's ``/ gas`` and DP
average the gradient is exactly that of the mean over the global batch's pairs, for every
TP/PP/DP layout (the same argument as SFT's token weights, pipelines/token_weights.py).

With ``dpo.rpo_alpha`` > 0 the loss adds ``alpha * NLL``, NLL = the mean of ``-log p`` over the
chosen answer tokens of the global batch (TRL's ``sft`` loss term: its mean over the batch's
chosen completion tokens). Its token sum is the chosen rows' sequence log-probs again, so it costs
nothing beyond DPO; each micro-batch weighs it by ``nll_scale = gas * dp / N_chosen``
(:meth:`DPOObjective.prepare`, one all-reduce of one number over DP per step) for the same
layout-free mean.

The policy's sequence log-probs are ``head.sequence_logps``: vocab-parallel cross entropy summed
over ``loss_mask`` per row, so the vocabulary is never gathered; under PP this runs on the last
stage only. Logged statistics (TRL's ``rewards/*``) are returned as sums so that ranks can add them.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from megatron_llama.config import DPOConfig
from megatron_llama.model import sequence_logps
from megatron_llama.model.dpo_loss import dpo_loss, reward_stats

from .objectives import Objective

# what dpo_step_loss's statistics hold, in order (sums over pairs; pairs last). The first six are
# TRL's names; prefers_chosen: share of pairs whose chosen answer is the more likely one under the
# policy (log p(chosen) > log p(rejected)), reference_prefers_chosen: the same under the reference;
# nll: -log p per chosen answer token (summed with chosen_tokens, reported as their ratio)
STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "prefers_chosen", "reference_prefers_chosen", "nll", "chosen_tokens", "loss", "pairs")


def dpo_step_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, ref_logps: torch.Tensor,
                  cfg: DPOConfig, pair_scale: float,
                  nll_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [s, 2P, V/tp] (this TP rank's slice); labels, loss_mask [2P, s]; ref_logps [2P].
    ``nll_scale``: the weight of one chosen answer token's ``-log p`` in the ``rpo_alpha`` term
    (None: 1 / this micro-batch's chosen answer tokens, i.e. their mean).
    Returns (the micro-batch's scaled loss, a scalar to backpropagate; statistics [12] float64:
    the sums of ``STAT_NAMES`` over its pairs), the same on every TP rank."""
    policy = sequence_logps(logits, labels, loss_mask)
    terms = dpo_loss(policy, ref_logps.to(policy.device), loss_mask.sum(dim=1), cfg.beta, cfg.loss,
                     cfg.label_smoothing)
    pairs = terms["loss"].shape[0]
    chosen_nll = -policy[:pairs].sum()  # sum of -log p over the chosen answer tokens (no second gather)
    chosen_tokens = loss_mask[:pairs].sum().double()
    loss = terms["loss"].sum() * pair_scale
    if cfg.rpo_alpha:
        scale = nll_scale if nll_scale is not None else 1.0 / chosen_tokens.clamp(min=1.0).float()
        loss = loss + cfg.rpo_alpha * scale * chosen_nll
    pol, ref = policy.detach().double(), ref_logps.to(policy.device).double()
    stats = torch.cat([reward_stats(terms["chosen_rewards"], terms["rejected_rewards"]),
                       torch.stack([pol[:pairs].sum(), pol[pairs:].sum(), (pol[:pairs] > pol[pairs:]).double().sum(),
                                    (ref[:pairs] > ref[pairs:]).double().sum(), -pol[:pairs].sum(), chosen_tokens]),
                       terms["loss"].detach().double().sum().view(1),
                       torch.tensor([float(pairs)], dtype=torch.float64, device=policy.device)])
    return loss, stats


def mean_stats(sums: torch.Tensor) -> dict[str, float]:
    """Summed statistics (over micro-batches and ranks) -> TRL-style means per pair; ``nll`` per
    chosen answer token."""
    values = dict(zip(STAT_NAMES, sums.tolist()))
    pairs = max(values.pop("pairs"), 1.0)
    tokens = max(values.pop("chosen_tokens"), 1.0)
    return {name: v / (tokens if name == "nll" else pairs) for name, v in values.items()}


class DPOObjective(Objective):
    """``train.objective=dpo``: the policy's LM head output (vocab-parallel logits) -> DPO loss.

    ``labels`` is the pair contract's ``(labels, loss_mask, margin, pair_index)``; the margin is the
    reward model's and is not used here. The reference log-probs of a pair are looked up by its
    ``pair_index`` in the table of the split being read (:meth:`reading`), filled before the first
    step by the reference pass (launch/reference_pass.py), during which :meth:`recording` makes
    ``loss`` store the policy's own log-probs instead (the policy is the reference at step 0)."""

    name = "dpo"
    pairs = True
    metric_names = tuple(n for n in STAT_NAMES if n not in ("chosen_tokens", "loss", "pairs"))
    num_sums = len(STAT_NAMES)

    def __init__(self, tp: int, cfg: DPOConfig):
        super().__init__(tp)
        self.cfg = cfg
        self.tables: dict[str, torch.Tensor] = {}  # split -> [total_pairs, 2] float64 (NaN: not in the split)
        self.split = "train"
        self._record: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.nll_scale: Optional[float] = None  # the rpo_alpha term's weight per chosen token (prepare)

    def prepare(self, micro_batches: list, dp: int, dp_group) -> None:
        """Before a step or an evaluation over this DP rank's ``gas`` micro-batches (every rank, PP
        stages included): ``nll_scale = gas * dp / N``, N = chosen answer tokens of the global batch,
        so that the NLL term is their mean in every layout (pipelines/token_weights.py's argument)."""
        self.nll_scale = None
        if not self.cfg.rpo_alpha or not micro_batches:
            return
        # (tokens, labels, loss_mask, margin, pair_index): the chosen rows are the first P
        local = sum(float(mb[2][:mb[4].shape[0]].sum()) for mb in micro_batches)
        count = torch.tensor([local], dtype=torch.float64, device=micro_batches[0][2].device)
        if dp > 1:
            dist.all_reduce(count, group=dp_group)
        self.nll_scale = len(micro_batches) * dp / max(float(count.item()), 1.0)

    @contextlib.contextmanager
    def reading(self, split: str):
        """Look reference log-probs up in ``split``'s table (validation reads the held-out one)."""
        before, self.split = self.split, split
        try:
            yield
        finally:
            self.split = before

    @contextlib.contextmanager
    def recording(self, logps: torch.Tensor, hits: torch.Tensor):
        """Reference pass: ``loss`` writes each pair's log-probs into ``logps`` [total_pairs, 2] and
        counts it in ``hits`` [total_pairs] (pairs with a negative ``pair_index`` are padding)."""
        self._record = (logps, hits)
        try:
            yield
        finally:
            self._record = None

    def reference_of(self, pair_index: torch.Tensor) -> torch.Tensor:
        """[P] global pair indices -> [2P] reference log-probs (chosen rows, then rejected rows)."""
        table = self.tables.get(self.split)
        if table is None:
            raise RuntimeError(f"DPO: no reference log-probs for the {self.split} split (the reference pass "
                               "runs before the first step)")
        ref = table.to(pair_index.device)[pair_index]  # [P, 2]
        if torch.isnan(ref).any():
            raise RuntimeError("DPO: a pair without a reference log-prob reached the loss")
        return torch.cat([ref[:, 0], ref[:, 1]])

    def loss(self, output: torch.Tensor, labels) -> torch.Tensor:
        labels, loss_mask, _margin, pair_index = labels
        if self._record is not None:
            return self._store(output, labels, loss_mask, pair_index)
        loss, stats = dpo_step_loss(output, labels, loss_mask, self.reference_of(pair_index), self.cfg,
                                    1.0 / pair_index.shape[0], self.nll_scale)
        self._add(stats)
        return loss

    def _store(self, output, labels, loss_mask, pair_index) -> torch.Tensor:
        logps, hits = self._record
        seq = sequence_logps(output, labels, loss_mask).double()
        pairs = pair_index.shape[0]
        real = pair_index >= 0
        idx = pair_index[real].to(logps.device)
        logps[idx, 0] = seq[:pairs][real].to(logps.device)
        logps[idx, 1] = seq[pairs:][real].to(logps.device)
        hits[idx] = 1.0
        return seq.new_zeros(()).float()

    def metrics(self, sums: torch.Tensor) -> dict:
        return {k: v for k, v in mean_stats(sums).items() if k != "loss"}
