"""Checkpoint at the end, auto-resume from ``latest``, and the one-command main job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_equivalence import base_overrides

ROOT = Path(__file__).resolve().parents[1]


def _run(rank, world, overrides, max_steps):
    from launch.train import train
    from megatron_llama.config import load_config
    s = train(load_config(None, overrides), max_steps=max_steps, log=False, save=True)
    return s.losses, s.resumed_from, s.checkpoint


def _run_mapped(rank, world, overrides, max_steps):
    """:func:`_run` with the GPU runs' memory-mapped checkpoint load (megatron_llama/checkpoint/mapped_load.py)."""
    from pipelines.engine import TrainEngine
    default, TrainEngine.mapped_load_devices = TrainEngine.mapped_load_devices, ("cuda", "cpu")
    try:
        return _run(rank, world, overrides, max_steps)
    finally:
        TrainEngine.mapped_load_devices = default


COMMON = base_overrides("tiny", dp=1) + ["parallel.pp=2", "train.steps=6"]
_WHOLE = {}


def uninterrupted(dist_pool, tmp_path_factory):
    """Losses of the 6-step PP2 run without interruption (computed once per session)."""
    if "losses" not in _WHOLE:
        save_dir = tmp_path_factory.mktemp("whole")
        _WHOLE["losses"] = dist_pool(2).run(_run, COMMON + [f"train.save_dir={save_dir}"], None)[0][0]
    return _WHOLE["losses"]


@pytest.mark.distributed
def test_resume_continues_exactly(dist_pool, tmp_path, tmp_path_factory):
    pool = dist_pool(2)
    whole = uninterrupted(dist_pool, tmp_path_factory)
    part = COMMON + [f"train.save_dir={tmp_path / 'split'}"]
    first, resumed, ckpt = pool.run(_run, part, 3)[0]
    assert resumed is None and ckpt.endswith("step0000003")
    meta = json.loads((Path(ckpt) / "run.json").read_text())
    assert meta["step"] == 3 and meta["consumed_samples"] == 12 and meta["layout"]["pp"] == 2
    rest, resumed, ckpt = pool.run(_run, part, None)[0]
    assert resumed == 3 and ckpt.endswith("step0000006")
    assert first + rest == pytest.approx(whole, rel=1e-6)
    (tmp_path / "split" / "latest").write_text("step0000003")  # resume step 3 again, the files mapped
    mapped, resumed, _ = pool.run(_run_mapped, part, None)[0]
    assert resumed == 3 and mapped == rest  # bitwise
    # a different layout cannot resume this checkpoint: a clear error, not a crash
    from megatron_llama.config import ConfigError  # noqa: F401
    with pytest.raises(RuntimeError, match="was saved with TP1·PP2·DP1"):
        dist_pool(1).run(_run, base_overrides("tiny", dp=1) + ["train.steps=8",
                                                               f"train.save_dir={tmp_path / 'split'}"], None)


def _run_until_signal(rank, world, overrides, at_step, on_rank, signum):
    """Train; after step ``at_step`` process ``on_rank`` sends itself a real ``signum``."""
    import signal
    from launch.train import train
    from megatron_llama.config import load_config

    def hook(step):
        if step == at_step and rank == on_rank:
            os.kill(os.getpid(), signum)
    s = train(load_config(None, overrides), log=False, save=True, on_step=hook)
    assert signal.getsignal(signum) is signal.SIG_DFL, "train() must restore the previous handlers"
    return s.losses, s.stop_signal, s.final_step, s.checkpoint


@pytest.mark.distributed
def test_sigterm_saves_stops_and_resumes_exactly(dist_pool, tmp_path, tmp_path_factory):
    """SIGTERM reaches one rank only: every rank stops after the same step with a checkpoint;
    timed saves (save_minutes) happen meanwhile; half-written newer checkpoints are skipped on
    resume, and the resumed run's losses are the uninterrupted run's."""
    import shutil
    import signal
    pool = dist_pool(2)
    whole = uninterrupted(dist_pool, tmp_path_factory)
    save = tmp_path / "run"
    part = COMMON + [f"train.save_dir={save}"]
    # save_minutes=1e-6: rank 0's clock says "due" at every step boundary
    results = pool.run(_run_until_signal, part + ["train.save_minutes=1e-6", "train.keep_last=2"],
                       3, 1, signal.SIGTERM)
    for losses, stop_signal, final_step, ckpt in results:
        assert stop_signal == signal.SIGTERM and final_step == 3 and len(losses) == 3
        assert ckpt.endswith("step0000003")
    first = results[0][0]
    # timed saves at steps 1 and 2, the signal's at 3; keep_last=2; nothing left under a .tmp name
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("step")) == ["step0000002", "step0000003"]
    assert (save / "latest").read_text() == "step0000003"
    assert json.loads((save / "step0000002" / "run.json").read_text())["reason"] == "timed"
    assert json.loads((save / "step0000003" / "run.json").read_text())["reason"] == "SIGTERM"
    assert json.loads((save / "summary.json").read_text())["stop_signal"] == signal.SIGTERM
    # a crash while writing step 5 (temporary name), a step-4 directory without its marker, and
    # no `latest`: the resume must still take step 3
    shutil.copytree(save / "step0000003", save / "step0000005.tmp")
    shutil.copytree(save / "step0000003", save / "step0000004", ignore=shutil.ignore_patterns("run.json"))
    (save / "latest").unlink()
    rest, resumed, ckpt = pool.run(_run, part, None)[0]
    assert resumed == 3 and len(rest) == 3 and ckpt.endswith("step0000006")
    assert first + rest == pytest.approx(whole, rel=1e-6)
    assert not (save / "step0000005.tmp").exists()


def test_main_exit_status_after_a_clean_stop(monkeypatch):
    """A run stopped by a signal (checkpoint saved) exits with 128 + signal, like a shell."""
    import signal
    import launch.train as lt
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    overrides = ["configs/tiny-cpu-3d.yaml", "parallel.tp=1", "parallel.pp=1", "parallel.dp=1"]
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGUSR1, 138), (None, 0)):
        monkeypatch.setattr(lt, "train", lambda cfg, s=signum: lt.TrainSummary(stop_signal=s))
        assert lt.main(overrides) == status


@pytest.mark.slow
def test_main_job_one_command(tmp_path):
    """``mllama-train CONFIG`` without a launcher: starts its processes, reads the shipped corpus
    (tokenizer + preprocessing on first use), logs, leaves a checkpoint and a summary."""
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", "configs/tiny-cpu-3d.yaml", "parallel.tp=1", "parallel.dp=1",
           "train.steps=12", "train.log_interval=4", f"train.save_dir={save}",
           f"data.cache_dir={tmp_path / 'data'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "starting 2 local processes" in out
    steps = [l for l in out.splitlines() if l.startswith("step ")]
    assert [l.split("|")[0].strip() for l in steps] == ["step  4/12", "step  8/12", "step 12/12"]
    for key in ("loss", "lr", "grad", "tok/s", "TFLOP/s/GPU", "MFU", "mem", "ETA"):
        assert key in steps[0]
    summary = json.loads((save / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert (save / "latest").read_text().strip() == "step0000012"
    assert (save / "summary.txt").read_text().startswith("done: 12 steps")


@pytest.mark.slow
def test_cli_sigterm_from_outside(tmp_path):
    """``mllama-train`` under a launcher's environment, killed from outside with SIGTERM mid-run:
    one line says where it stopped, the checkpoint is complete, exit status 143."""
    import signal
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", "configs/tiny-cpu-3d.yaml", "parallel.tp=1", "parallel.pp=1",
           "parallel.dp=1", "data.synthetic=true", "data.seq_len=32", "train.steps=100000", f"train.save_dir={save}"]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("step "):
                p.send_signal(signal.SIGTERM)
                break
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 143, out[-2000:] + err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("received SIGTERM at step ") and "re-submit to resume" in last, out[-2000:]
    step = int(last.split("at step ")[1].split(":")[0])
    assert (save / "latest").read_text() == f"step{step:07d}"
    assert json.loads((save / f"step{step:07d}" / "run.json").read_text())["reason"] == "SIGTERM"


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
