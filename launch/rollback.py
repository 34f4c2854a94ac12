"""Rollback after a loss spike: reload the last checkpoint and never read the bad samples again.

BLOOM's remedy (bigscience): go back to the last checkpoint before the spike and skip the data
that led to it. Here the skipped range is every global sample from the checkpoint's position to
the end of the spiking batch, ``[consumed at the checkpoint, consumed after the spike)``; the run
continues from the checkpoint's step on the samples after that range. The sampler is a pure
function of the stream position (megatron_llama/data/sampler.py), so skipping is only moving the
position: :meth:`SkippedSamples.advance` jumps over recorded ranges whenever a step would start
inside one.

The ranges are kept in ``<save_dir>/skipped_samples.json`` (written when the rollback happens,
so a crash before the next checkpoint cannot forget them) and in every later checkpoint's
``run.json`` (``skipped_samples``); a resumed run takes the union, so resuming from any
checkpoint, even one older than the rollback, reads the same samples in the same steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from megatron_llama import checkpoint

from .spikes import Verdict, describe

FILE = "skipped_samples.json"


class SkippedSamples:
    """Sorted, merged ``[start, end)`` ranges of global sample positions never trained on."""

    def __init__(self, save_dir: Optional[str], ranges=()):
        self.save_dir = save_dir
        self.ranges: list[list[int]] = []
        for a, b in ranges:
            self._insert(int(a), int(b))

    @classmethod
    def load(cls, save_dir: str, meta: Optional[dict]) -> "SkippedSamples":
        ranges = list((meta or {}).get("skipped_samples", []))
        path = Path(save_dir) / FILE
        if path.is_file():
            ranges += json.loads(path.read_text())
        return cls(save_dir, ranges)

    def _insert(self, a: int, b: int) -> None:
        merged = []
        for x, y in sorted(self.ranges + [[a, b]]):
            if merged and x <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], y)
            else:
                merged.append([x, y])
        self.ranges = merged

    def add(self, start: int, end: int, write: bool) -> None:
        """Record ``[start, end)``; ``write`` (rank 0) persists the ranges atomically."""
        self._insert(start, end)
        if write and self.save_dir:
            path = Path(self.save_dir) / FILE
            tmp = path.with_name(FILE + ".tmp")
            tmp.write_text(json.dumps(self.ranges))
            os.replace(tmp, path)

    def advance(self, consumed: int) -> int:
        """The stream position to read from: ``consumed``, or the end of the range it falls in."""
        for a, b in self.ranges:
            if a <= consumed < b:
                consumed = b
        return consumed


def roll_back(engine, layout, save_dir: str, skips: SkippedSamples, bad_end: int) -> Optional[tuple[int, int, int]]:
    """Reload the newest complete checkpoint (every rank), skip ``[its samples, bad_end)``.
    Returns ``(step, consumed to continue from, first skipped sample)``, or None without a checkpoint."""
    if checkpoint.latest(save_dir) is None:
        return None
    step, consumed = checkpoint.resume(engine, layout, save_dir)
    skips.add(consumed, bad_end, write=layout.rank == 0)
    return step, bad_end, consumed


def reposition(batches, skips: SkippedSamples, consumed: int) -> int:
    """Move the micro-batch iterator (a MicroBatchIterator) past recorded ranges; the new position."""
    new = skips.advance(consumed)
    if new != consumed:
        batches.consumed_samples = new
    return new


def respond(verdict: Verdict, step: int, samples: tuple[int, int], engine, layout, save_dir: Optional[str],
            skips: SkippedSamples, batches, log: Callable[[str], None],
            event: Callable[[int, dict], None]) -> tuple[int, int]:
    """Log a NaN / spike verdict (one line, plus a ``metrics.jsonl`` event) and carry out a
    rollback; returns the ``(step, consumed samples)`` to continue from (every rank alike)."""
    line = describe(verdict, step, samples)
    log(line)
    event(step, {"kind": verdict.kind, "action": verdict.action, "loss": verdict.loss,
                 "grad_norm": verdict.grad_norm, "samples": list(samples), "line": line})
    consumed = samples[1]
    if verdict.action != "rollback":
        return step, consumed
    back = roll_back(engine, layout, save_dir, skips, consumed) if save_dir else None
    if back is None:
        log(f"  no checkpoint in {save_dir} to roll back to: the step was skipped instead")
        return step, consumed
    step, consumed, first = back
    batches.consumed_samples = consumed
    log(f"  rolled back to step {step}; samples [{first}, {consumed}) are skipped for good "
        "(recorded in skipped_samples.json and in later checkpoints)")
    return step, consumed
