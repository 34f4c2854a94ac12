"""TEST HOOK: injected failures, to prove the supervisor, the watchdog and the checkpoints recover.

Never set in a real run. ``MLLAMA_FAULT`` holds comma-separated faults
``KIND:rank=R:step=S[:attempt=A][:restart=N]``:

``kill``         SIGKILL rank R right after optimizer step S (a lost GPU or node)
``kill-saving``  SIGKILL rank R while checkpoint S is written (``stepS.tmp`` exists, shards done)
``kill-writing`` SIGKILL rank R from its background writer (``train.async_save``) once it has written
                 the first file of checkpoint S, while training goes on
``stall``        rank R stops before reading the batches of step S+1 (a wedged data loader)
``term``         rank R sends SIGTERM to its parent (mllama-train's supervisor) after step S
``wait-signal``  rank R waits after step S until SIGTERM / SIGUSR1 arrives (signal a run at a known step)
``corrupt``      after step S rank R truncates the largest file of the newest complete checkpoint to half
                 its size (storage damage), then SIGKILLs itself

``attempt`` restricts a fault to one attempt of the supervisor (``MLLAMA_ATTEMPT``, 0 first) and
``restart`` to one run of a SLURM job (``SLURM_RESTART_COUNT``, 0 first), so a restarted or
requeued run does not meet the same fault again. Example::

    MLLAMA_FAULT=kill:rank=1:step=3:attempt=0,kill-saving:rank=0:step=4:attempt=1 mllama-train ...
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

KINDS = ("kill", "kill-saving", "kill-writing", "stall", "term", "wait-signal", "corrupt")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    attempt: Optional[int] = None
    restart: Optional[int] = None


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, *fields = item.split(":")
        kv = dict(f.split("=", 1) for f in fields)
        if kind not in KINDS or not {"rank", "step"} <= kv.keys():
            raise ValueError(f"MLLAMA_FAULT item {item!r}: expected KIND:rank=R:step=S[:attempt=A], KIND in {KINDS}")
        opt = {k: int(kv[k]) for k in ("attempt", "restart") if k in kv}
        faults.append(Fault(kind, int(kv["rank"]), int(kv["step"]), **opt))
    return faults


class Faults:
    """The faults of this rank and attempt; :meth:`at` fires the ones due at a point."""

    def __init__(self, rank: int, stop_requested: Callable[[], bool] = lambda: False, save_dir: str = "",
                 env=os.environ):
        attempt = int(env.get("MLLAMA_ATTEMPT", "0"))
        restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        self.stop_requested, self.save_dir = stop_requested, save_dir
        self.faults = [f for f in parse(env.get("MLLAMA_FAULT", ""))
                       if f.rank == rank and f.attempt in (None, attempt) and f.restart in (None, restart)]

    def at(self, kind: str, step: int) -> None:
        for f in self.faults:
            if f.kind == kind and f.step == step:
                if kind == "wait-signal":
                    while not self.stop_requested():
                        time.sleep(0.05)
                elif kind == "corrupt":
                    _truncate_newest_checkpoint(self.save_dir)
                    _fire("kill")
                else:
                    _fire(kind)


def _fire(kind: str) -> None:
    if kind in ("kill", "kill-saving", "kill-writing"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "term":
        os.kill(os.getppid(), signal.SIGTERM)
    elif kind == "stall":
        while True:
            time.sleep(3600)


def _truncate_newest_checkpoint(save_dir: str) -> None:
    from megatron_llama.checkpoint import complete_checkpoints
    newest = complete_checkpoints(Path(save_dir))[-1]
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "run.json"),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
