"""megatron_llama/model/fused_loss.py: the head's chunked linear + cross entropy (the logits never
whole) gives the loss and every gradient of the logits path (``lm_loss(model(tokens), labels)``:
F.cross_entropy at TP 1, megatron-core's vocab-parallel cross entropy at TP 2), fp32 on CPU,
rel 1e-5: several chunks with a shorter last one, ignored labels (-100) at TP 1, tied
embeddings, a padded vocabulary whose padding rows sit on the second TP rank."""
import pytest
import torch

RTOL = 1e-5


def _compare(overrides, ignore: bool, rows: int):
    from megatron.core import parallel_state as ps
    from megatron_llama.config import load_config
    from megatron_llama.model import LlamaModel, fused_loss, lm_loss
    from pipelines.topology import build_topology

    cfg = load_config(None, overrides)
    build_topology(cfg.parallel, 7, torch.device("cpu"))
    saved = fused_loss.CHUNK_BYTES, fused_loss.MIN_ROWS
    fused_loss.CHUNK_BYTES, fused_loss.MIN_ROWS = 2 * cfg.model.padded_vocab_size(cfg.parallel.tp) // cfg.parallel.tp * rows, 4
    try:
        out = []
        for fused in (False, True):
            model = LlamaModel(cfg.model, cfg.parallel, seed=3)
            g = torch.Generator().manual_seed(0)
            tokens, labels = (torch.randint(0, cfg.model.vocab_size, (3, 15), generator=g) for _ in range(2))
            if ignore:
                labels[0, :5] = -100
            loss = model(tokens, labels=labels) if fused else lm_loss(model(tokens), labels)
            loss.backward()
            out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    finally:
        fused_loss.CHUNK_BYTES, fused_loss.MIN_ROWS = saved
        ps.destroy_model_parallel()
    (ref_loss, ref), (loss, grads) = out
    worst = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref.items())
    return ref_loss, loss, worst


def _tp1(rank, world, extra, ignore):
    return _compare(["model.preset=tiny", "model.vocab_size=509", *extra], ignore, rows=20)


@pytest.mark.distributed
@pytest.mark.parametrize("extra,ignore", [([], False), ([], True), (["model.tie_embeddings=true"], False)],
                         ids=["plain", "ignore-index", "tied"])
def test_fused_loss_equals_logits_path_tp1(dist_pool, extra, ignore):
    ((ref_loss, loss, worst),) = dist_pool(1).run(_tp1, extra, ignore)
    assert loss == pytest.approx(ref_loss, rel=RTOL) and worst < RTOL


def _tp2(rank, world):
    return _compare(["model.preset=tiny-gqa", "model.vocab_size=509", "parallel.tp=2"], False, rows=16)


@pytest.mark.distributed
def test_fused_loss_equals_vocab_parallel_path_tp2(dist_pool):
    results = dist_pool(2).run(_tp2)
    for ref_loss, loss, worst in results:
        assert loss == pytest.approx(ref_loss, rel=RTOL) and worst < RTOL
    assert results[0][1] == results[1][1]  # both TP ranks return the same loss
