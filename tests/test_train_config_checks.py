"""Run-level config checks that must fail fast, as one line, before any process starts."""
import pytest

from megatron_llama.config import ConfigError, load_config


def test_sequence_parallel_needs_tp_and_a_divisible_sequence(capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"sequence_parallel=true needs parallel.tp > 1"):
        load_config(None, ["model.preset=tiny", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match=r"data.seq_len=30 is not divisible by it"):
        load_config(None, ["model.preset=tiny", "parallel.tp=4", "data.seq_len=30", "parallel.sequence_parallel=true"])
    # through the command line: exit status 2 and one `error:` line, no traceback
    from launch.train import main
    monkeypatch.delenv("RANK", raising=False)
    assert main(["configs/tiny-cpu-3d.yaml", "parallel.tp=1", "parallel.sequence_parallel=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the TP-replicated "
                   "activations over the TP ranks): raise tp or set sequence_parallel=false"]


@pytest.mark.parametrize("key", ["save_interval", "save_minutes", "keep_last"])
def test_negative_checkpoint_settings_are_refused(key):
    with pytest.raises(ConfigError, match=f"train.{key} must be >= 0"):
        load_config(None, ["model.preset=tiny", f"train.{key}=-1"])
