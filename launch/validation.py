"""Validation loss and perplexity on the held-out split, every ``train.eval_interval`` steps and at the end.

The validation set is fixed for the whole run: the first ``train.eval_iters`` global batches of
the held-out windows (data/heldout.py) in the sampler's order for ``train.seed``, each DP rank
reading its own slice exactly as in training. Every layout with the same global batch therefore
sees the same windows and reports the same loss (tested: TP2·PP2·DP2 vs TP1·PP1·DP1). The loss
is the mean token loss over those batches, perplexity ``exp(loss)``. PP > 1 runs DeepSpeed's
``eval_batch`` (forward-only pipeline schedule); PP = 1 a forward pass without gradients.

Pair objectives (reward / dpo) validate on held-out pairs (``data.valid_fraction`` of the pairs or
``data.valid_sources``): ``min(train.eval_iters, batches of one pass)`` global batches in the
sampler's order, reporting the loss and the objective's metrics (reward: accuracy, mean reward
gap) with a ``valid_`` prefix; no perplexity.
"""
from __future__ import annotations

import contextlib

import math
from typing import Callable, Optional

from megatron_llama.data import MicroBatchIterator, build_train_dataset


class Validator:
    """``due(step, last)`` and ``run() -> {"valid_loss", "valid_ppl"}`` (same on every rank)."""

    def __init__(self, cfg, layout, engine, rank_zero_first: Callable):
        self.cfg, self.layout, self.engine = cfg, layout, engine
        if cfg.preference:
            from megatron_llama.data.preference_build import build_preference_dataset
            self.dataset = build_preference_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size,
                                                    rank_zero_first=rank_zero_first, split="valid")
        else:
            self.dataset = build_train_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size,
                                               rank_zero_first=rank_zero_first, split="valid")
        self.best: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.dataset is not None

    def describe(self) -> str:
        t = self.cfg.train
        if not self.enabled:
            return "no validation (set data.valid_fraction or data.valid_sources)"
        every = f"every {t.eval_interval} steps and at the end" if t.eval_interval else "at the end"
        d = self.cfg.data
        if self.cfg.preference:
            return (f"validation {every}: {self.iters} batches of {len(self.dataset):,} held-out pairs "
                    f"({'data.valid_sources' if d.valid_sources else f'{d.valid_fraction:g} of the pairs'})")
        origin = ("data.valid_sources" if d.valid_sources else "synthetic" if d.synthetic
                  else f"{d.valid_fraction:g} of the documents")
        return f"validation {every}: {t.eval_iters} batches of {len(self.dataset):,} held-out windows ({origin})"

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.train.eval_interval
        return self.enabled and (last or bool(every and step % every == 0))

    @property
    def iters(self) -> int:
        t = self.cfg.train
        if not self.cfg.preference:
            return t.eval_iters
        return min(t.eval_iters, self.dataset.epoch_steps(t.micro_batch_size * t.grad_accum_steps * self.layout.dp))

    def run(self) -> dict:
        t = self.cfg.train
        if self.cfg.preference:
            return self._run_pairs()
        batches = MicroBatchIterator(self.dataset, t.seed, 0, self.layout.dp_rank, self.layout.dp,
                                     t.micro_batch_size)
        losses = [self.engine.eval_step(next(batches) for _ in range(t.grad_accum_steps))
                  for _ in range(t.eval_iters)]
        loss = sum(losses) / len(losses)
        if math.isfinite(loss) and (self.best is None or loss < self.best):
            self.best = loss
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 700.0))}

    def _run_pairs(self) -> dict:
        from megatron_llama.data.preference_dataset import PreferenceBatchIterator
        t, objective = self.cfg.train, self.engine.objective
        batches = PreferenceBatchIterator(self.dataset, t.seed, 0, self.layout.dp_rank, self.layout.dp,
                                          t.micro_batch_size)
        objective.collect(self.engine.device)  # drop sums left by training
        reading = getattr(objective, "reading", None)  # DPO: the held-out pairs' reference log-probs
        with reading("valid") if reading else contextlib.nullcontext():
            losses = [self.engine.eval_step(next(batches) for _ in range(t.grad_accum_steps))
                      for _ in range(self.iters)]
        loss = sum(losses) / len(losses)
        if math.isfinite(loss) and (self.best is None or loss < self.best):
            self.best = loss
        return {"valid_loss": loss, **{f"valid_{k}": v for k, v in objective.collect(self.engine.device).items()}}
