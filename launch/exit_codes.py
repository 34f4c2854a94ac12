"""Exit status of ``mllama-train``: what happened, and what a supervisor or job script should do.

======  ==========================================================  ===========================
status  meaning                                                     what to do
======  ==========================================================  ===========================
0       done: ``train.steps`` reached, final checkpoint saved        nothing
1       failed (a crash, a rank killed, a lost node)                 restart: resumes from the
                                                                    newest complete checkpoint
2       bad input (config, data, checkpoint, flags): one ``error:``  never restart; fix the input
        line says what to change
3       hang: a rank made no progress for ``train.hang_timeout_s``   restart
        (its line names rank, step and phase)
4       diverged: too many loss spikes / NaNs                        do not restart blindly
128+N   stopped by signal N (143 SIGTERM, 138 SIGUSR1, 130 SIGINT    requeue / re-submit: resumes
        = Ctrl-C) after a checkpoint was saved                      where it stopped
======  ==========================================================  ===========================

The in-allocation supervisor (launch/supervisor.py) restarts on 1 and 3 only; the SLURM script
(launch/slurm/train.sbatch) requeues on 128+N.
"""
from __future__ import annotations

import signal

DONE = 0
FAILED = 1
BAD_INPUT = 2
HANG = 3
DIVERGED = 4
SIGNAL_BASE = 128

RESTARTABLE = (FAILED, HANG)

HELP = """exit status:
  0      done (train.steps reached, final checkpoint saved)
  1      failed: a crash or a lost rank; restart it, it resumes from the newest complete checkpoint
  2      bad input (one 'error:' line says what to fix); never restarted
  3      hang: a rank made no progress for train.hang_timeout_s (its line says rank, step, phase); restart
  4      diverged (too many loss spikes / NaNs); do not restart blindly
  128+N  stopped by signal N after saving a checkpoint (143 SIGTERM, 138 SIGUSR1, 130 Ctrl-C): re-submit
  Started without a launcher, mllama-train restarts itself on 1 and 3 (train.max_restarts times,
  waiting train.restart_backoff_s, doubling) before giving up."""


def for_signal(signum: int) -> int:
    """Status of a run that saved and stopped because of ``signum``: 128 + signum, like a shell."""
    return SIGNAL_BASE + int(signum)


def from_returncode(returncode: int) -> int:
    """A child's ``Popen.returncode`` as one of ours: killed by a signal (negative) is a failure,
    since nothing was saved; statuses we do not know are failures too."""
    if returncode < 0:
        return FAILED
    if returncode in (DONE, FAILED, BAD_INPUT, HANG, DIVERGED) or returncode > SIGNAL_BASE:
        return returncode
    return FAILED


def should_restart(status: int) -> bool:
    return status in RESTARTABLE


def describe(status: int) -> str:
    names = {DONE: "done", FAILED: "failed", BAD_INPUT: "bad input", HANG: "hang detected",
             DIVERGED: "diverged"}
    if status in names:
        return names[status]
    if status > SIGNAL_BASE:
        try:
            return f"stopped by {signal.Signals(status - SIGNAL_BASE).name}"
        except ValueError:
            return f"stopped by signal {status - SIGNAL_BASE}"
    return f"status {status}"
