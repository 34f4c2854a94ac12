"""Sequence parallelism (``parallel.sequence_parallel=true``) changes where activations live, not
the numbers: over 10 steps the losses and gradient norms equal those of the same layout without
it, in fp32 on CPU (real gloo all-gathers / reduce-scatters through megatron-core's mappings).

A norm weight whose gradient were not summed over the TP group would change the gradient norm
at the first step and the losses from the second; a wrong RoPE position (s taken from the
[s/tp, b, d] input) or an unscattered embedding would change the first loss.
"""
import pytest

from test_train_equivalence import base_overrides, max_diffs

STEPS = 10
RTOL = 1e-5


def _train(rank, world, overrides, steps):
    from launch.train import train
    from megatron_llama.config import load_config
    s = train(load_config(None, overrides), max_steps=steps, log=False, save=False)
    return s.losses, s.grad_norms


def _run(dist_pool, tp, pp, extra):
    overrides = base_overrides("tiny-gqa") + [f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.dp=1", *extra]
    results = dist_pool(tp * pp).run(_train, overrides, STEPS)
    for other in results[1:]:  # every rank reports the same numbers
        assert other[0] == pytest.approx(results[0][0], rel=1e-6)
    return results[0]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,extra", [
    (2, 1, ["parallel.activation_checkpointing=selective"]),
    (2, 2, []),
], ids=["TP2-selective", "TP2-PP2"])
def test_sequence_parallel_matches_off(dist_pool, tp, pp, extra):
    off_losses, off_norms = _run(dist_pool, tp, pp, extra)
    on_losses, on_norms = _run(dist_pool, tp, pp, [*extra, "parallel.sequence_parallel=true"])
    assert len(on_losses) == STEPS and max(off_losses) - min(off_losses) > 1e-3
    print(f"\nTP{tp}·PP{pp} {' '.join(extra)} SP on vs off over {STEPS} steps: losses {max_diffs(on_losses, off_losses)}, "
          f"grad norms {max_diffs(on_norms, off_norms)}")
    assert on_losses == pytest.approx(off_losses, rel=RTOL, abs=0)
    assert on_norms == pytest.approx(off_norms, rel=RTOL, abs=0)
