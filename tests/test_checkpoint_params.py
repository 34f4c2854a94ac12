"""The parameter table (megatron_llama/checkpoint/params.py) equals the real model's parameters:
names, full shapes and TP splits of ``LlamaModel`` (PP = 1) and the ``{layer}.{local}`` names of
DeepSpeed's PipelineModule (PP = 2), at TP 2 on real gloo ranks. A tied model is one weight in
the table; under PP its LM head holds a copy named by the row's ``pipe_copy``."""
import pytest

from megatron_llama.checkpoint.params import check_key_set, param_index, param_table, pipeline_names
from megatron_llama.config import ConfigError, preset

SHAPES = {"mha": dict(vocab_size=501), "gqa-bias": dict(vocab_size=501, qkv_bias=True, num_kv_heads=2),
          "tied-ln": dict(vocab_size=501, tie_embeddings=True, embedding_layernorm=True)}


def _real_params(rank, world, overrides, pp):
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed
    cfg = load_config(None, ["model.preset=tiny", *[f"model.{k}={v}" for k, v in overrides.items()],
                             "data.seq_len=16", "data.synthetic=true", "parallel.tp=2", f"parallel.pp={pp}",
                             "train.precision=fp32"])
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, 1, device)
    module = TrainEngine(cfg, layout, topo, device, lambda s: 1.0).engine.module
    return {n: (tuple(p.full_shape), p.tp_split) for n, p in module.named_parameters()}


@pytest.mark.distributed
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_table_is_the_model(dist_pool, shape):
    cfg = preset("tiny", **SHAPES[shape])
    table = param_table(cfg, tp=2)
    real = dist_pool(2).run(_real_params, SHAPES[shape], 1)[0]
    assert {p.name: (p.shape, p.split) for p in table} == real
    assert [p.name for p in table] == list(real)  # pipeline order = the model's order


@pytest.mark.distributed
@pytest.mark.parametrize("shape", ["mha", "tied-ln"])
def test_pipeline_names(dist_pool, shape):
    cfg = preset("tiny", **SHAPES[shape])
    per_stage = dist_pool(4).run(_real_params, SHAPES[shape], 2)
    real = {**per_stage[0], **per_stage[-1]}  # ranks 0 (stage 0) and 3 (stage 1) at TP2·PP2
    assert {name: (p.shape, p.split) for name, p in pipeline_names(cfg, tp=2).items()} == real


def test_tied_weight_is_one_row():
    tied = param_index(preset("tiny", vocab_size=501, tie_embeddings=True), tp=2)
    assert "head.output.weight" not in tied
    emb = tied["embedding.word_embeddings.weight"]
    assert (emb.pipe_name, emb.pipe_copy) == ("0.word_embeddings.weight", "6.output.weight")  # 4 layers
    assert all(p.pipe_copy is None for p in tied.values() if p is not emb)
    assert param_index(preset("tiny", vocab_size=501), tp=2)["embedding.word_embeddings.weight"].pipe_copy is None


def test_vocab_padding_and_strict_keys():
    cfg = preset("tiny", vocab_size=501)
    assert param_index(cfg, tp=4)["head.output.weight"].shape == (504, 64)
    assert param_index(cfg, tp=1)["embedding.word_embeddings.weight"].shape == (501, 64)
    want = set(param_index(cfg))
    check_key_set(set(want), want, "ok")
    with pytest.raises(ConfigError, match="missing 1 tensor.*layers.0.mlp.down.weight.*unexpected 1.*extra"):
        check_key_set(want - {"layers.0.mlp.down.weight"} | {"extra"}, want, "ckpt")
