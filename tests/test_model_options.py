"""Model options without a Hugging Face Llama counterpart: BLOOM's LayerNorm after the embedding.

Checked by what it must do: the embedding output is the LayerNorm of the looked-up rows
(against ``F.layer_norm`` applied by hand, rel err <= 1e-6), and the model is TP-invariant with it
(TP 2 logits, gathered, equal TP 1 logits to fp32 rounding, rel err <= 1e-5).
"""
import pytest
import torch

TOL = 1e-5


def _logits_task(rank, world, tp):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_llama.config import ParallelConfig, preset
    from megatron_llama.model import LlamaModel

    parallel_state.initialize_model_parallel(tp, 1)
    cfg = preset("tiny", embedding_layernorm=True)
    model = LlamaModel(cfg, ParallelConfig(tp=tp), seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = model.embedding(tokens)
        raw = model.embedding.word_embeddings(tokens).transpose(0, 1)
        ref_h = torch.nn.functional.layer_norm(raw, (cfg.hidden_size,), eps=cfg.norm_eps)
        logits = model(tokens)
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    norm_err = ((h - ref_h).norm() / ref_h.norm()).item()
    return norm_err, logits[..., :cfg.vocab_size]


@pytest.mark.distributed
def test_embedding_layernorm_normalises_and_is_tp_invariant(dist_pool):
    norm_err, ref = dist_pool(1).run(_logits_task, 1)[0]
    assert norm_err <= 1e-6, f"embedding LayerNorm rel err {norm_err:.2e}"
    results = dist_pool(2).run(_logits_task, 2)
    for _, logits in results:
        err = ((logits.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= TOL, f"TP2 vs TP1 logits rel err {err:.2e}"
