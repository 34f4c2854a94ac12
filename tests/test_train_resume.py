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


@pytest.mark.distributed
def test_resume_continues_exactly(dist_pool, tmp_path):
    pool = dist_pool(2)
    common = base_overrides("tiny", dp=1) + ["parallel.pp=2", "train.steps=6"]
    whole, _, _ = pool.run(_run, common + [f"train.save_dir={tmp_path / 'whole'}"], None)[0]
    part = common + [f"train.save_dir={tmp_path / 'split'}"]
    first, resumed, ckpt = pool.run(_run, part, 3)[0]
    assert resumed is None and ckpt.endswith("step0000003")
    meta = json.loads((Path(ckpt) / "run.json").read_text())
    assert meta["step"] == 3 and meta["consumed_samples"] == 12 and meta["layout"]["pp"] == 2
    rest, resumed, ckpt = pool.run(_run, part, None)[0]
    assert resumed == 3 and ckpt.endswith("step0000006")
    assert first + rest == pytest.approx(whole, rel=1e-6)
    # a different layout cannot resume this checkpoint: a clear error, not a crash
    from megatron_llama.config import ConfigError  # noqa: F401
    with pytest.raises(RuntimeError, match="was saved with TP1·PP2·DP1"):
        dist_pool(1).run(_run, base_overrides("tiny", dp=1) + ["train.steps=8",
                                                               f"train.save_dir={tmp_path / 'split'}"], None)


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
