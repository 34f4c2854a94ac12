"""ZeRO gradient communication options (parallel.overlap_comm / reduce_bucket_size /
allgather_bucket_size / contiguous_gradients): passed to DeepSpeed, validated at the edge, and
numerically inert: 10 steps train to the same losses as the TP1·PP1·DP1 reference.

Small buckets (20k elements; the tiny model has ~200k parameters) make DeepSpeed reduce and gather
in many pieces, and with overlap_comm reduce them during the backward pass, on a side stream.
"""
import pytest

from megatron_llama.config import ConfigError, ParallelConfig
from pipelines.engine import zero_config
from test_train_equivalence import RTOL, max_diffs, reference, run_layout

SMALL = ["parallel.reduce_bucket_size=20000", "parallel.allgather_bucket_size=20000"]


@pytest.mark.distributed
@pytest.mark.parametrize("pp,extra", [
    (1, ["parallel.zero_stage=1", "parallel.overlap_comm=true", *SMALL]),
    (1, ["parallel.zero_stage=2", "parallel.overlap_comm=true", "parallel.contiguous_gradients=false", *SMALL]),
    (2, ["parallel.zero_stage=1", "parallel.contiguous_gradients=false", *SMALL]),
], ids=["DP2-ZeRO1-overlap", "DP2-ZeRO2-overlap-noncontiguous", "PP2-DP2-ZeRO1-small-buckets"])
def test_same_losses_as_reference(dist_pool, pp, extra):
    ref_losses, ref_norms = reference(dist_pool, "tiny")
    losses, norms = run_layout(dist_pool, 1, pp, 2, "tiny", extra=extra)
    print(f"\nPP{pp}·DP2 {' '.join(extra)} vs TP1·PP1·DP1: losses {max_diffs(losses, ref_losses)}, "
          f"grad norms {max_diffs(norms, ref_norms)}")
    assert losses == pytest.approx(ref_losses, rel=RTOL, abs=0)
    assert norms == pytest.approx(ref_norms, rel=1e-4)


def test_options_reach_deepspeed_and_bad_values_are_refused():
    p = ParallelConfig(zero_stage=2, overlap_comm=True, reduce_bucket_size=1000, allgather_bucket_size=2000,
                       contiguous_gradients=False)
    assert zero_config(p) == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000,
                              "allgather_bucket_size": 2000, "contiguous_gradients": False}
    with pytest.raises(ConfigError, match="reduce_bucket_size must be a positive"):
        ParallelConfig(reduce_bucket_size=0)
    with pytest.raises(ConfigError, match="allgather_bucket_size must be a positive"):
        ParallelConfig(allgather_bucket_size=-5)
    with pytest.raises(ConfigError, match="overlap_comm=true needs ZeRO"):
        ParallelConfig(zero_stage=0, overlap_comm=True)
    with pytest.raises(ConfigError, match="overlap_comm=true with parallel.pp=2.*set parallel.overlap_comm=false"):
        ParallelConfig(pp=2, overlap_comm=True)


def test_bench_takes_the_options(capsys):
    from launch.bench import _parallel_settings, main
    assert _parallel_settings("overlap_comm=true,reduce_bucket_size=50000000") == {
        "overlap_comm": True, "reduce_bucket_size": 50000000}
    assert main(["--parallel", "overlap_comm=maybe"]) == 2
    assert main(["--parallel", "tp=2"]) == 2
    assert main(["--parallel", "zero_stage=0,overlap_comm=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
