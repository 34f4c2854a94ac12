"""Loss spikes and NaNs: decided before the optimizer step, identically on every rank.

Every optimizer step is judged on its global loss and gradient norm (the same numbers on every
rank, so every rank takes the same decision without talking):

* ``nonfinite``: NaN or Inf in the loss or the gradient norm. Never reaches the weights: the step
  is skipped, whatever ``train.spike_action`` says.
* ``spike``: after ``train.spike_warmup`` steps, the loss is more than ``train.spike_zscore``
  standard deviations above the mean of the last ``train.spike_window`` accepted losses (the
  deviation is floored at 1 % of the mean, so a flat loss curve does not turn noise into spikes).
  ``train.spike_action`` says what to do: ``warn`` (log it, train on), ``skip`` (no update) or
  ``rollback`` (reload the last checkpoint and skip the samples since it, bigscience's remedy for
  BLOOM's spikes; launch/rollback.py).

Each event is one log line with the step and the global sample range. ``train.spike_max_in_row``
skipped or rolled-back steps in a row stop the run with exit status 4 (:data:`DIVERGED`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

# launch/exit_codes.py (the cluster engineer's) documents every status; 4 = diverged
DIVERGED = 4


@dataclass
class Verdict:
    kind: str                 # "ok", "nonfinite" or "spike"
    action: str               # "none", "warn", "skip" or "rollback"
    loss: float
    grad_norm: Optional[float]
    zscore: Optional[float] = None

    @property
    def applied(self) -> bool:
        """Whether the step's update reaches the weights."""
        return self.action in ("none", "warn")


def _finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(x)


class SpikeDetector:
    """Rolling z-score of the loss over the last ``window`` accepted steps."""

    def __init__(self, action: str, zscore: float, window: int, warmup: int):
        self.action, self.zscore, self.warmup = action, zscore, warmup
        self.history: deque = deque(maxlen=window)
        self.seen = 0

    def judge(self, loss: float, grad_norm: Optional[float]) -> Verdict:
        if not (_finite(loss) and _finite(grad_norm)):
            return Verdict("nonfinite", "skip", loss, grad_norm)
        if self.seen >= self.warmup and len(self.history) >= 2:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
            z = (loss - mean) / max(std, 0.01 * abs(mean), 1e-8)
            if z > self.zscore:
                return Verdict("spike", self.action, loss, grad_norm, z)
        return Verdict("ok", "none", loss, grad_norm)

    def accept(self, loss: float) -> None:
        self.history.append(loss)
        self.seen += 1


class StepGuard:
    """Glue between the engine's ``step_gate`` and the training loop.

    ``gate(loss, grad_norm)`` runs inside the optimizer step (pipelines/engine.py) and returns
    whether to skip the update; ``after_step`` then completes the verdict (DeepSpeed may have
    skipped a non-finite step by itself before asking the gate), counts it, and raises
    :class:`TrainingDiverged` after ``max_in_row`` unapplied steps in a row.
    """

    def __init__(self, train_cfg):
        t = train_cfg
        self.detector = SpikeDetector(t.spike_action, t.spike_zscore, t.spike_window, t.spike_warmup)
        self.max_in_row = t.spike_max_in_row
        self.pending: Optional[Verdict] = None
        self.in_row = 0
        self.counts = {"skipped": 0, "rollbacks": 0, "spikes": 0, "nonfinite": 0}

    def state_dict(self) -> dict:
        """Kept in every checkpoint's run.json, so a resumed run detects spikes from its first step."""
        return {"history": list(self.detector.history), "seen": self.detector.seen}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.detector.history.extend(state.get("history", []))
            self.detector.seen = int(state.get("seen", 0))

    def gate(self, loss: float, grad_norm: Optional[float]) -> bool:
        self.pending = self.detector.judge(loss, grad_norm)
        return not self.pending.applied

    def after_step(self, result) -> Verdict:
        """``result``: the engine's StepResult (loss, grad_norm, skipped)."""
        verdict, self.pending = self.pending, None
        if verdict is None or (result.skipped and verdict.applied):  # DeepSpeed skipped it itself
            verdict = self.detector.judge(result.loss, result.grad_norm)
            if verdict.kind == "ok":
                verdict = Verdict("nonfinite", "skip", result.loss, result.grad_norm)
        if verdict.kind == "ok" or verdict.action == "warn":
            self.detector.accept(verdict.loss)
        if verdict.kind != "ok":
            self.counts["spikes" if verdict.kind == "spike" else "nonfinite"] += 1
        if verdict.action == "skip":
            self.counts["skipped"] += 1
        elif verdict.action == "rollback":
            self.counts["rollbacks"] += 1
        self.in_row = 0 if verdict.applied else self.in_row + 1
        return verdict

    def diverged(self, step: int) -> Optional[str]:
        """The reason to stop (after ``max_in_row`` unapplied steps in a row), or None."""
        if self.in_row < self.max_in_row:
            return None
        return (f"training diverged: {self.in_row} steps in a row up to step {step} were skipped or rolled "
                f"back (loss spikes / NaNs); exit status {DIVERGED}. Look at the loss curve (mllama-plot), "
                "lower train.lr or check the data before resuming")


def describe(verdict: Verdict, step: int, samples: tuple[int, int]) -> str:
    """One log line for a non-ok verdict: what, where, which samples, what was done."""
    what = ("NaN/Inf" + f" (loss {verdict.loss:.4g}, grad norm {verdict.grad_norm})" if verdict.kind == "nonfinite"
            else f"loss spike: loss {verdict.loss:.4f} is {verdict.zscore:.1f} std above the recent mean")
    done = {"warn": "training on", "skip": "step skipped (weights and optimizer state unchanged)",
            "rollback": "rolling back to the last checkpoint and skipping these samples"}[verdict.action]
    return f"step {step}: {what}; samples [{samples[0]}, {samples[1]}); {done}"
