"""train.wandb_project: rank 0 logs every step to wandb (offline here); a failing wandb never stops a run."""
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest

from megatron_llama.config import load_config

from test_train_equivalence import base_overrides


def _train_offline(rank, world, overrides, wandb_dir):
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true")
    try:
        from launch.train import train
        s = train(load_config(None, overrides), log=False, save=True)
    finally:
        for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
            os.environ.pop(k, None)
    return s.losses


@pytest.mark.distributed
def test_offline_run_logs_every_step_with_the_config(dist_pool, tmp_path):
    wandb_dir = tmp_path / "wandb-home"
    wandb_dir.mkdir()
    overrides = base_overrides("tiny", dp=1) + ["train.steps=3", "train.wandb_project=mllama-test",
                                                f"train.save_dir={tmp_path / 'run'}"]
    losses = dist_pool(2).run(_train_offline, overrides + ["parallel.pp=2"], str(wandb_dir))[0]
    assert len(losses) == 3
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "rank 0 only: one offline run"
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # wandb 0.31 has no reader for its offline log: the protobuf records carry the names verbatim
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mem_gib", "step_time_s",
                "wandb_project", "mllama-test", "micro_batch_size", "layout"):
        assert key.encode() in records, key
    assert records.count(b"tokens_per_s") >= 3  # one history record per step


class _FakeRun:
    def __init__(self):
        self.logged, self.finished = [], None

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self, exit_code=0):
        self.finished = exit_code


def _fake_wandb(monkeypatch, init):
    mod = types.ModuleType("wandb")
    mod.init = init
    mod.Settings = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "wandb", mod)


LAYOUT = SimpleNamespace(tp=1, pp=2, dp=1, world_size=2)


def test_failed_init_prints_one_warning_and_training_goes_on(monkeypatch, tmp_path):
    from launch.wandb_log import WandbLogger

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty).\nCall wandb.login(key=...)")
    _fake_wandb(monkeypatch, init)
    cfg = load_config(None, ["model.preset=tiny", "train.wandb_project=p", f"train.save_dir={tmp_path}"])
    lines = []
    wb = WandbLogger(cfg, LAYOUT, enabled=True, warn=lines.append)
    assert wb.run is None and wb.sink is None
    assert lines == ["warning: wandb logging disabled, wandb.init failed (RuntimeError: api_key not configured "
                     "(no-tty).); training continues"]
    wb.log(1, {"loss": 1.0})
    wb.finish()


def test_resolved_config_and_metrics_reach_wandb_and_resume_keeps_the_run(monkeypatch, tmp_path):
    from launch.wandb_log import WandbLogger
    calls, run = [], _FakeRun()
    _fake_wandb(monkeypatch, lambda **kw: calls.append(kw) or run)
    cfg = load_config(None, ["model.preset=tiny", "train.wandb_project=p", f"train.save_dir={tmp_path}"])
    assert WandbLogger(cfg, LAYOUT, enabled=False).run is None  # not rank 0
    with WandbLogger(cfg, LAYOUT, enabled=True) as wb:
        wb.log(7, {"loss": 2.0, "mfu": None})
    assert run.logged == [(7, {"loss": 2.0})] and run.finished == 0
    kw = calls[0]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert kw["project"] == "p" and kw["id"] == run_id and kw["resume"] == "allow"
    assert kw["config"]["train"]["wandb_project"] == "p" and kw["config"]["layout"]["pp"] == 2
    WandbLogger(cfg, LAYOUT, enabled=True)  # a resumed job: same id from <save_dir>/wandb_run_id
    assert calls[1]["id"] == run_id and json.dumps(calls[1]["config"])


def test_metrics_sink_gets_every_step():
    import torch
    from launch.metrics import StepLogger
    cfg = load_config(None, ["model.preset=tiny", "data.seq_len=32", "train.log_interval=10"])
    got = []
    logger = StepLogger(cfg, LAYOUT, torch.device("cpu"), tokens_per_step=128, total_steps=20, enabled=False,
                        sink=lambda step, m: got.append((step, m)))
    result = SimpleNamespace(loss=3.0, lr=1e-3, grad_norm=0.5)
    for step in (1, 2, 3):
        logger.step(step, result, elapsed_total=1.0, steps_done=step)
    assert [s for s, _ in got] == [1, 2, 3]
    m = got[-1][1]
    assert set(m) == {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "mem_gib", "step_time_s"}
    assert m["loss"] == 3.0 and m["tokens_per_s"] > 0 and m["mfu"] is None and m["mem_gib"] > 0
