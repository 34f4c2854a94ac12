"""Hang detection: a rank that makes no progress for ``train.hang_timeout_s`` exits with status 3.

The training loop calls :meth:`Heartbeat.beat` with the step and the phase it enters (``data``:
reading the next micro-batches; ``step``: forward, backward, optimizer and their collectives;
``boundary``: the per-step stop/save agreement; ``save``). A daemon thread checks the time since
the last beat; past the timeout it prints one line naming the rank, step and phase and ends the
process with ``os._exit(3)`` (a thread cannot raise into a main thread stuck in C code, and a
wedged collective never returns). Every rank runs its own watchdog, so a stall on one rank shows
up as its own line (phase ``data``, say) plus its peers' (stuck in ``step``), and the supervisor
restarts them all.

The process-group timeout (``train.collective_timeout_s``) is a second, coarser line of defence:
gloo and NCCL raise when a collective waits that long.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

from .exit_codes import HANG


class Heartbeat:
    def __init__(self, rank: int, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 on_hang: Callable[[str], None] | None = None):
        self.rank, self.timeout_s, self.clock = rank, timeout_s, clock
        self.on_hang = on_hang or _exit_hung
        self.step, self.phase = 0, "start"
        self.last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int, phase: str) -> None:
        self.step, self.phase, self.last = step, phase, self.clock()

    def check(self) -> bool:
        """True (and ``on_hang`` called) when the last beat is older than the timeout."""
        idle = self.clock() - self.last
        if self.timeout_s <= 0 or idle < self.timeout_s:
            return False
        self.on_hang(f"mllama-train: hang: rank {self.rank} made no progress for {idle:.0f} s at step "
                     f"{self.step} (phase: {self.phase}); exiting with status {HANG} so the supervisor "
                     "restarts the run (train.hang_timeout_s sets the limit)")
        return True

    def _watch(self) -> None:
        period = min(5.0, max(0.05, self.timeout_s / 10))
        while not self._stop.wait(period):
            if self.check():
                return

    def __enter__(self) -> "Heartbeat":
        self.last = self.clock()
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="mllama-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def _exit_hung(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    os._exit(HANG)
