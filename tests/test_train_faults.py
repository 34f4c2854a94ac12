"""Fault injection through the real ``mllama-train`` CLI (2 gloo processes, PP2, fp32 CPU).

One supervised run meets, one attempt after another (test hook MLLAMA_FAULT, launch/faults.py):
SIGKILL of rank 1 after step 3; SIGKILL of rank 0 while ``step0000004.tmp`` is being written; a
stalled data loader on rank 1 (the watchdog ends it with status 3); after step 7 a truncated shard
in the newest checkpoint (step 6) and SIGKILL of rank 1, so the restart must fall back to step 4.
Every loss of every attempt must equal the uninterrupted run's loss at that step, and the final
run's losses bitwise. (SIGTERM/SIGUSR1 forwarded by the supervisor, saved and requeued: test_slurm.py;
SIGTERM to a rank: test_train_resume.py.)
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_equivalence import base_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-cpu-3d.yaml")
STEPS = 10
OVERRIDES = base_overrides("tiny", dp=1) + ["parallel.tp=1", "parallel.pp=2", "parallel.dp=1",
                                            f"train.steps={STEPS}", "train.save_interval=2", "train.keep_last=2"]
FAULTS = ("kill:rank=1:step=3:attempt=0,kill-saving:rank=0:step=4:attempt=1,stall:rank=1:step=5:attempt=2,"
          "corrupt:rank=1:step=7:attempt=3")


def _reference(rank, world, overrides):
    from launch.train import train
    from megatron_llama.config import load_config
    return train(load_config(CONFIG, overrides), log=False, save=False).losses


def _cli(save_dir, *extra, fault=None, timeout=420):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLLAMA_FAULT")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    if fault:
        env["MLLAMA_FAULT"] = fault
    cmd = [sys.executable, "-m", "launch.train", CONFIG, *OVERRIDES, f"train.save_dir={save_dir}",
           "train.restart_backoff_s=0", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _losses_by_step(stdout: str) -> dict[int, float]:
    """``step N/10 | loss X`` lines (log_interval=1) of every attempt: step -> loss as printed."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step\s+(\d+)/\d+ \| loss ([\d.]+)", stdout, re.M)}


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_stalled_and_damaged_runs_recover_exactly(dist_pool, tmp_path):
    ref = dist_pool(2).run(_reference, OVERRIDES)[0]
    save = tmp_path / "run"
    p = _cli(save, "train.max_restarts=4", "train.hang_timeout_s=6", "train.log_interval=1", fault=FAULTS)
    log = p.stdout[-4000:] + p.stderr[-6000:]
    assert p.returncode == 0, log
    err = p.stderr
    assert err.count("rank 1 was killed by SIGKILL; restarting") == 2, log
    assert "rank 0 was killed by SIGKILL; restarting" in err, log
    hang = re.search(r"hang: rank 1 made no progress for \d+ s at step 6 \(phase: data\)", err)
    assert hang, log
    assert "exited with status 3 (hang detected); restarting" in err, log
    assert err.count("restarting from the newest complete checkpoint") == 4, log
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step0000006 is damaged" in warnings[0] and "bytes" in warnings[0], log
    # after the kill during the save of step 4: step 2, not the half-written step 4; after the
    # damaged step 6: step 4
    assert re.findall(r"resumed from step (\d+)", p.stdout) == ["2", "2", "4", "4"], log
    assert not list(save.glob("*.tmp")), "a half-written checkpoint was left behind"
    summary = json.loads((save / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["final_step"] == STEPS
    assert summary["losses"] == ref[4:]  # bitwise: the same floats
    printed = _losses_by_step(p.stdout)
    assert sorted(printed) == list(range(1, STEPS + 1))
    assert all(abs(printed[s] - ref[s - 1]) < 5e-5 for s in printed)  # printed with 4 decimals


@pytest.mark.slow
def test_bad_input_inside_the_ranks_is_one_line_and_status_2(tmp_path):
    """A missing corpus is found by the ranks (after mllama-train started them): the user sees the
    ranks' one error line and status 2, no launcher traceback, and nothing is restarted."""
    p = _cli(tmp_path / "run", "data.synthetic=false", f"data.corpus={tmp_path / 'missing.jsonl'}",
             f"data.cache_dir={tmp_path / 'cache'}")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "missing.jsonl" in errors[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr and "restarting" not in p.stderr
