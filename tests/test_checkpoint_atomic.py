"""The checkpoint directory protocol (megatron_llama/checkpoint/directory.py) without DeepSpeed shards: a fake engine
writes one file per "rank" so that crashes can be staged at every point of a save."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_llama import checkpoint
from megatron_llama.config import load_config

LAYOUT = SimpleNamespace(tp=1, pp=1, dp=1, world_size=1, describe=lambda: "TP1·PP1·DP1")


class FakeDeepSpeed:
    def __init__(self, crash_after_files=None):
        self.crash_after_files = crash_after_files

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False, "DeepSpeed must not write `latest` (ours is written last)"
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            if self.crash_after_files == i:
                raise KeyboardInterrupt("killed while writing")
            (d / f"mp_rank_{i:02d}_model_states.pt").write_text(json.dumps(client_state))


class FakeEngine:
    def __init__(self, crash_after_files=None):
        self.engine = FakeDeepSpeed(crash_after_files)
        self.loaded = None

    def save(self, save_dir, tag, client_state):  # as TrainEngine.save: no DeepSpeed 'latest'
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, save_dir, tag):
        self.loaded = tag
        return json.loads((Path(save_dir) / tag / "mp_rank_01_model_states.pt").read_text())


def _cfg(keep_last=2):
    return load_config(None, ["model.preset=tiny", f"train.keep_last={keep_last}"])


def _save(root, step, keep_last=2, crash_after_files=None):
    return checkpoint.save(FakeEngine(crash_after_files), _cfg(keep_last), LAYOUT, str(root), step,
                           consumed_samples=4 * step, last_loss=1.0)


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_save_renames_when_done_updates_latest_last_and_keeps_last_k(tmp_path):
    for step in (1, 2, 3):
        path = _save(tmp_path, step)
        assert path == tmp_path / checkpoint.tag_for(step)
        assert (tmp_path / "latest").read_text() == path.name
    assert _names(tmp_path) == ["latest", "step0000002", "step0000003"]
    meta = json.loads((tmp_path / "step0000003" / "run.json").read_text())
    assert meta["step"] == 3 and meta["consumed_samples"] == 12 and meta["layout"]["dp"] == 1
    engine = FakeEngine()
    assert checkpoint.resume(engine, LAYOUT, str(tmp_path)) == (3, 12) and engine.loaded == "step0000003"


def test_crash_during_save_leaves_previous_checkpoint_in_charge(tmp_path):
    _save(tmp_path, 2)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, crash_after_files=1)
    assert _names(tmp_path) == ["latest", "step0000002", "step0000004.tmp"]
    engine = FakeEngine()
    assert checkpoint.resume(engine, LAYOUT, str(tmp_path)) == (2, 8) and engine.loaded == "step0000002"
    # the next save removes the half-written directory
    _save(tmp_path, 3)
    assert _names(tmp_path) == ["latest", "step0000002", "step0000003"]


def test_half_written_newer_checkpoints_are_never_loaded(tmp_path):
    _save(tmp_path, 2, keep_last=0)
    _save(tmp_path, 3, keep_last=0)
    # a newer directory still under its temporary name, and one without the completeness marker
    (tmp_path / "step0000005.tmp").mkdir()
    (tmp_path / "step0000005.tmp" / "mp_rank_00_model_states.pt").write_text("{}")
    (tmp_path / "step0000004").mkdir()
    (tmp_path / "step0000004" / "mp_rank_00_model_states.pt").write_text("{}")
    assert checkpoint.latest(str(tmp_path))["tag"] == "step0000003"
    # `latest` pointing at the incomplete one (or missing): the newest complete checkpoint
    (tmp_path / "latest").write_text("step0000004")
    assert checkpoint.latest(str(tmp_path))["tag"] == "step0000003"
    (tmp_path / "latest").unlink()
    assert checkpoint.latest(str(tmp_path))["tag"] == "step0000003"
    # `latest` naming an older complete checkpoint is a deliberate roll-back: honoured
    (tmp_path / "latest").write_text("step0000002")
    assert checkpoint.latest(str(tmp_path))["tag"] == "step0000002"


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=0)
    (tmp_path / "latest").write_text("step0000001")  # rolled back by hand
    checkpoint.prune(tmp_path, keep_last=1)
    assert _names(tmp_path) == ["latest", "step0000001", "step0000003"]


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert checkpoint.latest(str(tmp_path / "missing")) is None
    assert checkpoint.resume(FakeEngine(), LAYOUT, str(tmp_path)) == (0, 0)


def test_save_dir_that_is_one_checkpoint_is_refused(tmp_path):
    """A converted (weights-only) checkpoint given as train.save_dir would silently train from
    scratch into it; the error says to use train.init_from instead."""
    from megatron_llama.config import ConfigError
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "run.json").write_text('{"step": 0, "weights_only": true}')
    with pytest.raises(ConfigError, match=r"single checkpoint .* train.init_from="):
        checkpoint.check_run_dir(str(tmp_path / "ckpt"))
    checkpoint.check_run_dir(str(tmp_path))           # a run directory: fine
    checkpoint.check_run_dir(str(tmp_path / "new"))   # not there yet: fine
