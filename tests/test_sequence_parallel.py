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


def _grads_with_and_without(rank, world, overrides):
    """One forward/backward of LlamaModel at TP2 with packed samples (``segments``), SP off and on:
    this rank's loss and every parameter's gradient."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron_llama.config import load_config
    from megatron_llama.model import LlamaModel, lm_loss
    from pipelines.topology import build_topology
    out = {}
    for sp in ("false", "true"):
        cfg = load_config(None, [*overrides, f"parallel.sequence_parallel={sp}"])
        if not ps.model_parallel_is_initialized():
            build_topology(cfg.parallel, 7, torch.device("cpu"))
        model = LlamaModel(cfg.model, cfg.parallel, seed=3)
        g = torch.Generator().manual_seed(0)
        tokens, labels = (torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g) for _ in range(2))
        segments = torch.tensor([[0] * 12 + [1] * 20, [0] * 25 + [1] * 7])  # two packed samples per row
        loss = lm_loss(model(tokens, segments), labels)
        loss.backward()
        out[sp] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ps.destroy_model_parallel()
    worst = max(((out["true"][1][n] - g).abs().max() / g.abs().max()).item() for n, g in out["false"][1].items())
    return out["false"][0], out["true"][0], worst, len(out["true"][1])


@pytest.mark.distributed
def test_masked_attention_and_embedding_norm_under_sequence_parallelism(dist_pool):
    """SFT's document mask (segments stay full-length [b, s] while activations are [s/tp, b, d]),
    selective recomputation, QKV biases, BLOOM's embedding LayerNorm and tied embeddings: every gradient of
    every TP rank equal with and without SP."""
    overrides = ["model.preset=tiny-gqa", "data.seq_len=32", "parallel.tp=2",
                 "parallel.activation_checkpointing=selective", "model.embedding_layernorm=true",
                 "model.tie_embeddings=true", "model.qkv_bias=true"]
    for loss_off, loss_on, worst, n in dist_pool(2).run(_grads_with_and_without, overrides):
        print(f"\nmasked TP2 SP on vs off: loss {loss_on:.7f} vs {loss_off:.7f}, worst gradient rel diff {worst:.1e} ({n} params)")
        assert loss_on == pytest.approx(loss_off, rel=RTOL)
        assert worst < RTOL
