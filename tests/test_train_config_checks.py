"""Run-level config checks that must fail fast, as one line, before any process starts."""
import pytest

from megatron_llama.config import ConfigError, load_config


def test_sequence_parallel_needs_a_sequence_divisible_by_tp(capsys, monkeypatch):
    load_config(None, ["model.preset=tiny", "data.seq_len=31", "parallel.sequence_parallel=true"])  # tp 1: no-op
    with pytest.raises(ConfigError, match=r"data.seq_len=30 is not divisible by it"):
        load_config(None, ["model.preset=tiny", "parallel.tp=4", "data.seq_len=30", "parallel.sequence_parallel=true"])
    # through the command line: exit status 2 and one `error:` line, no traceback
    from launch.train import main
    monkeypatch.delenv("RANK", raising=False)
    assert main(["configs/tiny-cpu-3d.yaml", "data.seq_len=63", "parallel.sequence_parallel=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: parallel.sequence_parallel=true splits the sequence over tp=2 ranks, but "
                   "data.seq_len=63 is not divisible by it: use a seq_len that is a multiple of tp"]


@pytest.mark.parametrize("key", ["save_interval", "save_minutes", "keep_last"])
def test_negative_checkpoint_settings_are_refused(key):
    with pytest.raises(ConfigError, match=f"train.{key} must be >= 0"):
        load_config(None, ["model.preset=tiny", f"train.{key}=-1"])
