"""``<save_dir>/metrics.jsonl``: the run's own record, one JSON object per line, written by rank 0.

Appended and flushed as the run goes, next to the checkpoints, so a crashed or killed run still
has everything up to its last step; a resumed run appends to the same file. ``mllama-plot``
(launch/plot.py) reads it, nothing else is needed. Record types (field ``type``):

* ``start``: an invocation began (``step`` it starts from, ``resumed``, layout, tokens per step);
* ``train``: one optimizer step (loss, lr, grad_norm, tokens_per_s, tflops_per_gpu, mfu, mem_gib,
  step_time_s, tokens_seen, skipped_steps, rollbacks, time);
* ``valid``: a validation (valid_loss, valid_ppl);
* ``event``: a NaN / spike / skip / rollback (kind, action, loss, grad_norm, samples, line);
* ``end``: the invocation finished (status, final step, wall time).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

FILE = "metrics.jsonl"


def _clean(value):
    """JSON has no NaN/Inf: write them as strings so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLog:
    def __init__(self, save_dir: str, enabled: bool):
        self.path = Path(save_dir) / FILE
        self.file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")

    def write(self, kind: str, step: int, record: dict) -> None:
        if self.file is None:
            return
        line = {"type": kind, "step": step, "time": round(time.time(), 3),
                **{k: _clean(v) for k, v in record.items()}}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_records(run_dir: str) -> list[dict]:
    """All records of ``<run_dir>/metrics.jsonl``; a torn last line (a crash mid-write) is ignored."""
    out = []
    with open(Path(run_dir) / FILE) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out.append({k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in rec.items()})
    return out
