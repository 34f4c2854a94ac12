"""``launch/slurm/train.sbatch`` on a real SLURM (slurm-wlm 22.05 installed and started inside the
test, tests/slurm_local.py, with two slurmd on this host): a tiny CPU job on 2 nodes x 1 rank gets the time-limit warning (USR1 to the batch
shell, sent on demand with ``scancel --batch``) at a known step, saves, requeues itself (same job id,
SLURM_RESTART_COUNT 1), resumes and finishes with the losses of an uninterrupted run, bitwise.
Skipped (with the reason) only where the machine is not root or cannot install packages.
"""
import json
import re
import sys
import time
from pathlib import Path

import pytest

from slurm_local import LocalSlurm, unavailable_reason
from test_train_faults import CONFIG, OVERRIDES, STEPS, _reference

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(predicate, timeout, what, slurm):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{slurm.log_tail()}")


@pytest.mark.slow
@pytest.mark.distributed
def test_time_limit_signal_saves_requeues_and_resumes_exactly(dist_pool, tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    ref = dist_pool(2).run(_reference, OVERRIDES)[0]
    run = tmp_path / "run"
    job_out = tmp_path / "job-%j.out"
    env = {"MLLAMA_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore",
           # rank 0 waits after step 3 of the first run until the signal arrives (test hook)
           "MLLAMA_FAULT": "wait-signal:rank=0:step=3:restart=0"}
    with LocalSlurm(tmp_path / "slurm", nodes=2) as slurm:
        t_submit = time.monotonic()
        job = slurm.run(["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--chdir={ROOT}",
                         f"--output={job_out}", str(ROOT / "launch/slurm/train.sbatch"), CONFIG, *OVERRIDES,
                         f"train.save_dir={run}", "train.log_interval=1", "train.restart_backoff_s=0"],
                        env=env).stdout.strip()
        node_log = run / "logs" / f"mllama-{job}-node0.log"  # rank 0 prints
        _wait_for(lambda: node_log.exists() and re.search(r"^step +3/", node_log.read_text(), re.M), 180,
                  "step 3", slurm)
        t_step = time.monotonic()
        slurm.run(["scancel", "--batch", "-s", "USR1", job])
        info = _wait_for(lambda: (j := slurm.job(job))["JobState"] == "COMPLETED" and j, 240,
                         "the requeued job to complete", slurm)
        out = Path(str(job_out).replace("%j", job)).read_text()
        print(f"SLURM timeline: submit->step 3 {t_step - t_submit:.0f} s, signal->completed "
              f"{time.monotonic() - t_step:.0f} s")
        assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", (info, out)
        # the kill switch: a job for a run directory holding NO_REQUEUE does nothing and says why
        (run / "NO_REQUEUE").touch()
        stopped = slurm.run(["sbatch", "--parsable", "--nodes=1", f"--chdir={ROOT}", f"--output={job_out}",
                             str(ROOT / "launch/slurm/train.sbatch"), CONFIG, *OVERRIDES, f"train.save_dir={run}"],
                            env=env).stdout.strip()
        _wait_for(lambda: slurm.job(stopped)["JobState"] == "COMPLETED", 60, "the kill-switched job", slurm)
    assert "kill switch" in Path(str(job_out).replace("%j", stopped)).read_text()
    # the first run's lines are still there (append mode), then the second run's
    assert "restart 0, 2 node(s)" in out and "restart 1, 2 node(s)" in out and out.count("requeueing") == 1, out
    assert (run / "logs" / f"mllama-{job}-node1.log").exists()
    log = node_log.read_text()
    assert "received SIGUSR1 at step 3" in log and "resumed from step 3" in log, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["final_step"] == STEPS
    assert summary["losses"] == ref[3:]  # bitwise
