"""Rank 0 drives lm-eval; the other ranks follow its batches.

lm-eval (tasks, prompts, metrics) runs on global rank 0 only. Each batch it scores is announced
to every rank with one small broadcast (a header ``[command, b, s]``) and the [b, s] token and
target tensors; every rank then runs the same collective forward (pipelines/forward_only.py).
When rank 0 is done, or fails anywhere in lm-eval, it broadcasts ``STOP`` (with the outcome) in
a ``finally``: the followers return instead of waiting in a collective, so no rank hangs on an
error in lm-eval, and rank 0 reports the error once.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from pipelines.forward_only import ForwardOnly

STOP, SCORE = 0, 1


class SharedForward:
    """``score(tokens, targets)`` on rank 0 runs the forward on every rank (see the module doc)."""

    def __init__(self, forward: ForwardOnly, device: torch.device, on_batch: Optional[Callable[[], None]] = None):
        self.forward, self.device = forward, device
        self.on_batch = on_batch  # called on every rank per batch (the trainer's hang watchdog beat)
        self.is_leader = dist.get_rank() == 0

    def score(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0 only: tokens, targets [b, s] int64 -> (log p(targets) [b, s], greedy tokens [b, s]) on the CPU."""
        assert self.is_leader, "only rank 0 drives; the other ranks call follow()"
        b, s = tokens.shape
        self._header(SCORE, b, s)
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        dist.broadcast(tokens, src=0)
        dist.broadcast(targets, src=0)
        return tuple(t.cpu() for t in self._run(tokens, targets))

    def follow(self) -> int:
        """Other ranks: run rank 0's batches until it stops; returns rank 0's exit status (launch/exit_codes.py)."""
        while True:
            header = torch.zeros(3, dtype=torch.int64, device=self.device)
            dist.broadcast(header, src=0)
            command, b, s = (int(x) for x in header.tolist())
            if command == STOP:
                return b
            tokens = torch.empty(b, s, dtype=torch.int64, device=self.device)
            targets = torch.empty_like(tokens)
            dist.broadcast(tokens, src=0)
            dist.broadcast(targets, src=0)
            self._run(tokens, targets)

    @contextlib.contextmanager
    def leading(self) -> Iterator["SharedForward"]:
        """Rank 0: the followers are released when the block ends, whether it succeeds or raises
        (they return 0, 2 for bad input (a ConfigError), or 1)."""
        from megatron_llama.config import ConfigError
        from . import exit_codes
        status = exit_codes.FAILED
        try:
            yield self
            status = exit_codes.DONE
        except ConfigError:
            status = exit_codes.BAD_INPUT
            raise
        finally:
            self._header(STOP, status, 0)

    def _header(self, command: int, b: int, s: int) -> None:
        dist.broadcast(torch.tensor([command, b, s], dtype=torch.int64, device=self.device), src=0)

    def _run(self, tokens: torch.Tensor, targets: torch.Tensor):
        if self.on_batch is not None:
            self.on_batch()
        return self.forward.score(tokens, targets)
