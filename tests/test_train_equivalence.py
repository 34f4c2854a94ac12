"""The central test: the same losses whatever the 3D layout.

Same seed, same data, same global batch (4 sequences of 32 tokens per step): the first 10
losses of TP1·PP1·DP1 (the reference), TP2, PP2, DP2 and TP2·PP2·DP2 agree within fp32
tolerance on CPU (gloo, one process per rank), and so do TP1 and TP2 with grouped-query
attention. The gradient norm (clipped at 1.0 over all TP, PP and DP ranks) must agree too:
a TP-replicated norm weight counted twice, or a stage missing from the sum, would show here.
"""
import pytest

STEPS = 10
# Loss differences between layouts come only from fp32 summation order (TP splits matmuls,
# DP/gas split the batch mean): observed ~1e-6; a real layout bug shows up at 1e-2 or more.
RTOL = 2e-5


def base_overrides(preset="tiny", dp=1):
    mbs = 2 if dp == 1 else 1  # global batch 4 = mbs x gas 2 x dp
    return [f"model.preset={preset}", "data.seq_len=32", "data.synthetic=true",
            f"train.micro_batch_size={mbs}", "train.grad_accum_steps=2", "train.global_batch_size=4",
            "train.steps=10", "train.warmup_steps=2", "train.lr=3e-3", "train.precision=fp32",
            "train.seed=7"]


def _train(rank, world, overrides, steps):
    from launch.train import train
    from megatron_llama.config import load_config
    cfg = load_config(None, overrides)
    s = train(cfg, max_steps=steps, log=False, save=False)
    return s.losses, s.grad_norms


def run_layout(dist_pool, tp, pp, dp, preset="tiny", extra=(), steps=STEPS):
    overrides = base_overrides(preset, dp) + [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
                                              *extra]
    results = dist_pool(tp * pp * dp).run(_train, overrides, steps)
    losses, norms = results[0]
    for other_losses, other_norms in results[1:]:  # every rank reports the same numbers
        assert other_losses == pytest.approx(losses, rel=1e-6)
        assert other_norms == pytest.approx(norms, rel=1e-6)
    return losses, norms


def max_diffs(a, b):
    abs_d = max(abs(x - y) for x, y in zip(a, b))
    rel_d = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return abs_d, rel_d


_REFERENCE = {}


def reference(dist_pool, preset):
    if preset not in _REFERENCE:
        _REFERENCE[preset] = run_layout(dist_pool, 1, 1, 1, preset)
    return _REFERENCE[preset]


@pytest.mark.distributed
@pytest.mark.parametrize("preset,tp,pp,dp", [
    ("tiny", 2, 1, 1), ("tiny", 1, 2, 1), ("tiny", 1, 1, 2), ("tiny", 2, 2, 2), ("tiny-gqa", 2, 1, 1),
], ids=["TP2", "PP2", "DP2", "TP2-PP2-DP2", "TP2-GQA"])
def test_losses_match_reference_layout(dist_pool, preset, tp, pp, dp):
    ref_losses, ref_norms = reference(dist_pool, preset)
    losses, norms = run_layout(dist_pool, tp, pp, dp, preset)
    assert len(losses) == STEPS
    assert max(ref_losses) - min(ref_losses) > 1e-3, "the reference run should move its weights"
    abs_d, rel_d = max_diffs(losses, ref_losses)
    print(f"\n{preset} TP{tp}·PP{pp}·DP{dp} vs TP1·PP1·DP1 over {STEPS} steps: "
          f"max |dloss| {abs_d:.2e}, max rel {rel_d:.2e}; grad norms {max_diffs(norms, ref_norms)}")
    assert losses == pytest.approx(ref_losses, rel=RTOL, abs=0)
    assert norms == pytest.approx(ref_norms, rel=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,dp,extra,rtol", [
    (1, 1, 2, ["parallel.zero_stage=2"], RTOL),
    (1, 1, 2, ["parallel.zero_stage=3"], RTOL),
    (1, 2, 1, ["parallel.activation_checkpointing=full"], RTOL),
    # the GPU precision path (bf16 weights, fp32 master weights and fp32 gradient accumulation,
    # DeepSpeed's BF16_Optimizer with the pipeline engine) run on CPU: bf16 rounding only
    (1, 2, 1, ["train.precision=bf16"], 5e-3),
], ids=["DP2-ZeRO2", "DP2-ZeRO3", "PP2-full-recompute", "PP2-bf16"])
def test_engine_variants_match_reference(dist_pool, tp, pp, dp, extra, rtol):
    ref_losses, _ = reference(dist_pool, "tiny")
    losses, _ = run_layout(dist_pool, tp, pp, dp, "tiny", extra=extra)
    abs_d, rel_d = max_diffs(losses, ref_losses)
    print(f"\nTP{tp}·PP{pp}·DP{dp} {' '.join(extra)} vs TP1·PP1·DP1: max |dloss| {abs_d:.2e}, max rel {rel_d:.2e}")
    assert losses == pytest.approx(ref_losses, rel=rtol, abs=0)
