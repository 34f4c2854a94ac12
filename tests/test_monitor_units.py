"""Pure pieces of run monitoring: held-out document split, spike detector, skipped sample ranges,
the metrics.jsonl record (no processes, no DeepSpeed)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from launch.rollback import SkippedSamples
from launch.run_log import RunLog, read_records
from launch.spikes import DIVERGED, SpikeDetector, StepGuard, describe
from megatron_llama.config import ConfigError, load_config
from megatron_llama.data.heldout import document_tokens, heldout_mask, split_documents


def test_heldout_split_is_deterministic_disjoint_and_near_the_fraction():
    a, b = heldout_mask(100_000, 0.05), heldout_mask(100_000, 0.05)
    assert np.array_equal(a, b)
    assert abs(a.mean() - 0.05) < 0.005
    # a document's side depends on its index only: a longer corpus keeps the old assignment
    assert np.array_equal(heldout_mask(1000, 0.05), a[:1000])
    train, valid = split_documents(1000, 0.05, "train"), split_documents(1000, 0.05, "valid")
    assert not set(train) & set(valid) and len(train) + len(valid) == 1000
    # tiny corpora still get one document on each side; fraction 0 holds out nothing
    assert heldout_mask(2, 0.001).sum() == 1 and heldout_mask(3, 0.49).sum() in (1, 2)
    assert not heldout_mask(50, 0.0).any()


def test_document_tokens_sums_sequences_per_document():
    assert document_tokens(np.array([3, 4, 5, 6]), np.array([0, 1, 3, 3, 4])).tolist() == [3, 9, 0, 6]


def test_valid_config_errors():
    with pytest.raises(ConfigError, match="valid_fraction must be in"):
        load_config(None, ["model.preset=tiny", "data.valid_fraction=0.7"])
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["model.preset=tiny", "data.valid_fraction=0.1", "data.valid_sources=[x]"])
    with pytest.raises(ConfigError, match="not supported yet"):
        load_config(None, ["model.preset=tiny", "data.sft=true", "data.valid_fraction=0.1"])
    with pytest.raises(ConfigError, match="spike_action"):
        load_config(None, ["model.preset=tiny", "train.spike_action=panic"])


def _cfg(**kw):
    base = dict(spike_action="skip", spike_zscore=4.0, spike_window=8, spike_warmup=3, spike_max_in_row=3)
    return SimpleNamespace(**{**base, **kw})


def test_spike_detector_warmup_zscore_and_nonfinite():
    d = SpikeDetector("rollback", zscore=4.0, window=8, warmup=3)
    assert d.judge(50.0, 1.0).kind == "ok"  # no history yet: nothing to compare with
    for x in (3.00, 3.02, 2.98, 3.01):
        assert d.judge(x, 1.0).kind == "ok"
        d.accept(x)
    v = d.judge(3.5, 1.0)
    assert v.kind == "spike" and v.action == "rollback" and v.zscore > 4 and not v.applied
    assert d.judge(3.05, 1.0).kind == "ok"  # within 4 std (std floored at 1% of the mean)
    for bad in ((float("nan"), 1.0), (3.0, float("inf")), (float("-inf"), None)):
        v = d.judge(*bad)
        assert v.kind == "nonfinite" and v.action == "skip"  # NaN is skipped whatever the action


def test_guard_counts_and_stops_after_too_many_in_a_row():
    guard = StepGuard(_cfg())
    step = lambda loss, skipped=False: guard.after_step(SimpleNamespace(loss=loss, grad_norm=1.0, skipped=skipped))
    for x in (3.0, 3.01, 2.99, 3.0):
        assert guard.gate(x, 1.0) is False and step(x).kind == "ok"
    assert guard.gate(9.0, 1.0) is True and step(9.0).action == "skip"
    # DeepSpeed skipped a non-finite step before asking the gate: still counted, as a NaN skip
    assert step(float("nan"), skipped=True).kind == "nonfinite"
    assert guard.diverged(6) is None
    assert guard.gate(float("nan"), None) is True and step(float("nan")).kind == "nonfinite"
    assert guard.in_row == 3 and f"exit status {DIVERGED}" in guard.diverged(7)
    assert guard.counts == {"skipped": 3, "rollbacks": 0, "spikes": 1, "nonfinite": 2}
    assert guard.gate(3.0, 1.0) is False and step(3.0).applied and guard.in_row == 0


def test_warn_trains_on_and_describe_names_step_and_samples():
    guard = StepGuard(_cfg(spike_action="warn", spike_warmup=2))
    for x in (3.0, 3.0, 3.0):
        guard.gate(x, 1.0), guard.after_step(SimpleNamespace(loss=x, grad_norm=1.0, skipped=False))
    assert guard.gate(8.0, 1.0) is False
    v = guard.after_step(SimpleNamespace(loss=8.0, grad_norm=1.0, skipped=False))
    assert v.kind == "spike" and v.applied and guard.in_row == 0
    line = describe(v, 17, (64, 72))
    assert line.startswith("step 17: loss spike") and "samples [64, 72)" in line and "training on" in line


def test_skipped_sample_ranges_merge_jump_and_persist(tmp_path):
    s = SkippedSamples(str(tmp_path))
    s.add(16, 20, write=True)
    s.add(8, 12, write=True)
    s.add(12, 14, write=False)
    assert s.ranges == [[8, 14], [16, 20]]
    assert [s.advance(c) for c in (4, 8, 12, 14, 16, 19, 20)] == [4, 14, 14, 14, 20, 20, 20]
    # a resume takes the union of the run-level file and the checkpoint's run.json
    loaded = SkippedSamples.load(str(tmp_path), {"skipped_samples": [[40, 44]]})
    assert loaded.ranges == [[8, 12], [16, 20], [40, 44]]


def test_run_log_keeps_nan_parseable_and_survives_a_torn_line(tmp_path):
    log = RunLog(str(tmp_path), enabled=True)
    log.write("train", 1, {"loss": 2.5, "grad_norm": float("nan")})
    log.write("train", 2, {"loss": float("inf")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')  # the process died mid-line
    recs = read_records(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2]
    assert math.isnan(recs[0]["grad_norm"]) and recs[1]["loss"] == math.inf
    assert all(json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2])
    assert not RunLog(str(tmp_path / "off"), enabled=False).path.parent.exists()


def test_missing_tensorboard_is_one_warning_and_training_goes_on(monkeypatch, tmp_path):
    import launch.tensorboard_log as tb

    def missing():
        raise ImportError("No module named 'tensorboard'")
    monkeypatch.setattr(tb, "_summary_writer", missing)
    lines = []
    logger = tb.TensorBoardLogger(str(tmp_path / "tb"), enabled=True, warn=lines.append)
    logger.log(1, {"loss": 2.0})
    logger.close()
    assert len(lines) == 1 and lines[0].startswith("warning: TensorBoard logging disabled")
    assert "training continues" in lines[0]


def test_guard_state_round_trips_through_a_checkpoint():
    a = StepGuard(_cfg())
    for x in (3.0, 3.1, 2.9):
        a.gate(x, 1.0), a.after_step(SimpleNamespace(loss=x, grad_norm=1.0, skipped=False))
    b = StepGuard(_cfg())
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.gate(9.0, 1.0) is True and b.pending.kind == "spike"  # no second warm-up
    b.load_state_dict(None)  # a fresh run: nothing to load


def test_plot_of_a_directory_without_metrics_is_one_error_line(tmp_path, capsys):
    from launch.plot import main
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics.jsonl not found" in err[0]
