"""When to save and when to stop, decided the same way on every rank at each step boundary.

* SIGTERM and SIGUSR1 (SLURM's warning before a time limit or preemption, e.g.
  ``sbatch --signal=USR1@120``) and SIGINT (Ctrl-C, which the terminal sends to every rank of the
  foreground process group) only set a flag (:class:`StopSignals`); nothing is done inside the
  handler, so Ctrl-C raises no KeyboardInterrupt in any rank. A signal may reach some ranks before others, so the flag is all-reduced (MAX)
  at the next step boundary and every rank stops after the same step.
* ``train.save_minutes``: rank 0 alone reads its clock; the flag travels in the same all-reduce.

:class:`StepBoundary` does both with one all-reduce of two integers per optimizer step (on the
device of the run's backend: a few microseconds next to a step; the loss ``.item()`` syncs the
stream anyway). It is only used when the run saves checkpoints.

A run stopped by a signal saves a checkpoint and exits with status 128 + signal number (143 for
SIGTERM, 138 for SIGUSR1), as a shell reports a process killed by that signal: a job script can
tell "stopped early, re-submit" (>= 128; 130 for Ctrl-C) from "finished" (0) and "failed" (1, 2). Re-submitting the
same command resumes from the checkpoint.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code_for(signum: int) -> int:
    """Exit status of a run stopped (cleanly) by ``signum``: 128 + signum, like a shell."""
    return 128 + int(signum)


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set ``received`` instead of killing the process.

    Only the main thread can install handlers; elsewhere this does nothing (``installed`` False).
    The previous handlers come back on exit.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self.installed = False
        self._previous: dict = {}

    def _handler(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous.clear()
        self.installed = False


@dataclass
class Decision:
    stop_signal: int = 0     # 0, or the signal every rank now stops for
    timed_save: bool = False  # save_minutes elapsed on rank 0's clock


class StepBoundary:
    """One all-reduce per step: ``[signal received, save_minutes due]`` with MAX over all ranks."""

    def __init__(self, signals: StopSignals, save_minutes: float, device, rank: int,
                 clock: Callable[[], float] = time.monotonic):
        self.signals, self.device, self.rank, self.clock = signals, device, rank, clock
        self.period_s = save_minutes * 60.0
        self.last_save = clock()

    def saved(self) -> None:
        """A checkpoint was just written (for whatever reason): the save_minutes clock restarts."""
        self.last_save = self.clock()

    def decide(self) -> Decision:
        import torch
        import torch.distributed as dist

        due = self.rank == 0 and self.period_s > 0 and self.clock() - self.last_save >= self.period_s
        flags = torch.tensor([self.signals.received or 0, int(due)], dtype=torch.int64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sig, due = (int(x) for x in flags.tolist())
        return Decision(stop_signal=sig, timed_save=bool(due))
