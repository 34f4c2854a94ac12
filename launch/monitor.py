"""Where a run's numbers go besides the console: ``metrics.jsonl``, TensorBoard and wandb.

One place that fans every record out, so the training loop says ``monitor.train(step, m)`` once.
The run counters (tokens seen, skipped steps, rollbacks) ride along with every training record.
Everything here is rank 0's job and optional except ``metrics.jsonl`` (written whenever the run
saves checkpoints): a logger that is missing or fails prints one warning and is dropped.
"""
from __future__ import annotations

from typing import Callable, Optional

from .run_log import RunLog
from .tensorboard_log import TensorBoardLogger


class RunMonitor:
    def __init__(self, cfg, layout, save: bool, wandb_sink: Optional[Callable[[int, dict], None]] = None):
        rank0 = layout.rank == 0
        self.run_log = RunLog(cfg.train.save_dir, enabled=rank0 and save)
        self.tensorboard = TensorBoardLogger(cfg.train.tensorboard_dir, enabled=rank0)
        self.wandb_sink = wandb_sink
        self.counters = {"tokens_seen": 0, "skipped_steps": 0, "rollbacks": 0}

    def _scalars(self, step: int, metrics: dict) -> None:
        self.tensorboard.log(step, metrics)
        if self.wandb_sink is not None:
            self.wandb_sink(step, metrics)

    def start(self, step: int, record: dict) -> None:
        self.run_log.write("start", step, record)

    def train(self, step: int, metrics: dict) -> None:
        record = {**metrics, **self.counters}
        self.run_log.write("train", step, record)
        self._scalars(step, record)

    def valid(self, step: int, metrics: dict) -> None:
        self.run_log.write("valid", step, metrics)
        self._scalars(step, metrics)

    def eval_tasks(self, step: int, metrics: dict) -> None:
        """lm-eval results of a checkpoint (launch/eval_in_training.py): ``eval/<task>/<metric>``."""
        self.run_log.write("eval_tasks", step, metrics)
        self._scalars(step, metrics)

    def event(self, step: int, record: dict) -> None:
        self.run_log.write("event", step, record)

    def end(self, step: int, record: dict) -> None:
        self.run_log.write("end", step, record)

    def close(self) -> None:
        self.tensorboard.close()
        self.run_log.close()

    def __enter__(self) -> "RunMonitor":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
