"""Asynchronous saves, Ctrl-C and crash output through the real ``mllama-train`` CLI (2 gloo
processes, PP2, fp32 CPU, the supervisor of launch/supervisor.py).

* A rank SIGKILLed by its background checkpoint writer (fault ``kill-writing``: step 4's files
  half written while training went on) leaves step 2 usable: the restart resumes from it and the
  losses equal an uninterrupted run's bitwise. The console shows the supervisor's line and one line
  pointing at the surviving rank's log, not its gloo traceback (that is in logs/rank-0.log).
* Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while an asynchronous save is
  in flight: one line, the pending save committed, a checkpoint at the step boundary, status 130,
  no KeyboardInterrupt traceback from any rank.
* ``train.async_save`` on a machine without the host memory for the buffers: one ``error:`` line,
  status 2, before any rank starts.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_train_faults import CONFIG, ROOT, _reference
from test_train_equivalence import base_overrides

STEPS = 6
OVERRIDES = base_overrides("tiny", dp=1) + ["parallel.tp=1", "parallel.pp=2", "parallel.dp=1",
                                            f"train.steps={STEPS}", "train.keep_last=2", "train.async_save=true",
                                            "train.restart_backoff_s=0", "train.log_interval=1"]


def _env(fault=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLLAMA_FAULT")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    if fault:
        env["MLLAMA_FAULT"] = fault
    return env


def _cmd(save_dir, *extra):
    return [sys.executable, "-m", "launch.train", CONFIG, *OVERRIDES, f"train.save_dir={save_dir}", *extra]


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_killed_during_the_background_write_resumes_from_the_previous_checkpoint(dist_pool, tmp_path):
    ref = dist_pool(2).run(_reference, OVERRIDES)[0]
    save = tmp_path / "run"
    p = subprocess.run(_cmd(save, "train.save_interval=2", "train.max_restarts=1"), cwd=ROOT,
                       env=_env("kill-writing:rank=1:step=4:attempt=0"), capture_output=True, text=True, timeout=300)
    log = p.stdout[-3000:] + p.stderr[-4000:]
    assert p.returncode == 0, log
    assert "resumed from step 2" in p.stdout, log  # not the half-written step 4
    summary = json.loads((save / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["losses"] == ref[2:]
    assert (save / "latest").read_text() == f"step{STEPS:07d}" and not list(save.glob("*.tmp"))
    # the console: the supervisor's line and a pointer to rank 0's log, no traceback
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert any("rank 1 was killed by SIGKILL; restarting from the newest complete checkpoint" in e for e in err), err
    assert any("rank 0 also failed, as a consequence" in e and "rank-0.log" in e for e in err), err
    assert len(err) <= 3, err
    rank0 = (save / "logs" / "rank-0.log").read_text()
    assert "Traceback (most recent call last)" in rank0 and "--- attempt 1" in rank0


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_saves_at_the_step_boundary_and_exits_130_in_one_line(tmp_path):
    save = tmp_path / "run"
    # rank 0 waits after step 3 until the signal is there, so it lands at a known step; the async
    # save of step 2 may still be in flight
    p = subprocess.Popen(_cmd(save, "train.save_interval=2"), cwd=ROOT, env=_env("wait-signal:rank=0:step=3"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                break
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: every process of the foreground group
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = "".join(lines) + out
    assert p.returncode == 130, out[-2000:] + err[-3000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err
    assert not [line for line in err.splitlines() if line.strip()], err
    said = [line for line in out.splitlines() if "SIGINT" in line]
    assert len(said) == 1 and said[0].startswith("received SIGINT at step 3: saved checkpoint"), out
    assert "status 130" in said[0] and "run the same command to resume" in said[0]
    assert (save / "latest").read_text() == "step0000003" and (save / "step0000003" / "run.json").is_file()
    assert (save / "step0000002" / "run.json").is_file() and not list(save.glob("*.tmp"))


def test_async_save_without_the_host_memory_for_its_buffers_is_one_line(tmp_path):
    """llama-7b with optimizer state is ~100 GB of buffers (plus as much training state on CPU)."""
    p = subprocess.run([sys.executable, "-m", "launch.train", CONFIG, "model.preset=llama-7b", "parallel.tp=1",
                        "parallel.pp=1", "parallel.dp=1", "train.async_save=true",
                        f"train.save_dir={tmp_path / 'run'}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: train.async_save=true keeps a host copy"), err
    assert "GiB" in err[0] and "train.async_save=false" in err[0]
