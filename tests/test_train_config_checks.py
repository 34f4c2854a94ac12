"""Run-level config checks that must fail fast, as one line, before any process starts."""
import pytest

from megatron_llama.config import ConfigError, load_config


def test_sequence_parallel_is_refused_not_ignored(capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"not supported yet: set parallel.sequence_parallel=false"):
        load_config(None, ["model.preset=tiny", "parallel.sequence_parallel=true"])
    # through the command line: exit status 2 and one `error:` line, no traceback
    from launch.train import main
    monkeypatch.delenv("RANK", raising=False)
    assert main(["configs/tiny-cpu-3d.yaml", "parallel.sequence_parallel=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: parallel.sequence_parallel=true is not supported yet: "
                   "set parallel.sequence_parallel=false"]


@pytest.mark.parametrize("key", ["save_interval", "save_minutes", "keep_last"])
def test_negative_checkpoint_settings_are_refused(key):
    with pytest.raises(ConfigError, match=f"train.{key} must be >= 0"):
        load_config(None, ["model.preset=tiny", f"train.{key}=-1"])
