"""Stage balancing: pure functions, no processes."""
import pytest

from megatron_llama.config import ParallelConfig, preset
from pipelines.balance import (blocks_per_stage, cost_weights, layer_kinds, parameter_weights, partition,
                               stage_boundaries)


def split(model, pp, method, tp=1, seq_len=2048):
    b = stage_boundaries(model, ParallelConfig(tp=tp, pp=pp, partition_method=method), seq_len=seq_len)
    assert b[0] == 0 and b[-1] == model.num_layers + 3 and len(b) == pp + 1
    return blocks_per_stage(b, model.num_layers)


@pytest.mark.parametrize("method", ["cost", "parameters"])
@pytest.mark.parametrize("pp", [4, 8])
def test_big_vocab_gives_end_stages_fewer_blocks(method, pp):
    blocks = split(preset("llama-7b", vocab_size=250880), pp, method)
    middle = blocks[1:-1]
    assert blocks[0] < min(middle) and blocks[-1] < min(middle), blocks
    assert sum(blocks) == 32


@pytest.mark.parametrize("method", ["cost", "parameters", "bloom"])
def test_32k_vocab_is_close_to_uniform(method):
    for pp in (2, 4, 8):
        blocks = split(preset("llama-7b"), pp, method)
        assert max(blocks) - min(blocks) <= 2, (pp, blocks)


def test_uniform_and_bloom_counts():
    m = preset("llama-7b")
    assert split(m, 4, "uniform") == [8, 8, 8, 8]
    # BLOOM counts embedding and head as one layer each: 34 units over 4 stages
    assert sum(split(m, 4, "bloom")) == 32
    tiny = preset("tiny")  # 4 blocks + embedding + head = 6 units, pp=3 -> 2 each
    assert split(tiny, 3, "bloom") == [1, 2, 1]


@pytest.mark.parametrize("method", ["bloom", "uniform", "parameters", "cost"])
def test_every_stage_has_a_block_even_when_embedding_dominates(method):
    # vocab 250k with 4 small blocks: the embedding alone outweighs everything, yet no stage
    # may be embedding-only (DeepSpeed issue 5384) or head-only.
    m = preset("tiny", vocab_size=250880)
    for pp in (2, 3, 4):
        assert min(split(m, pp, method, seq_len=64)) >= 1


def test_partition_is_optimal_on_a_small_case():
    weights = [5, 1, 1, 1, 1, 0, 5]
    is_block = [k == "block" for k in layer_kinds(4)]
    b = partition(weights, is_block, 2)
    assert b == [0, 3, 7]  # stage loads 7 and 7
    with pytest.raises(ValueError):
        partition(weights, is_block, 5)


def test_cost_model_terms():
    m = preset("llama-7b", vocab_size=250880)
    w = cost_weights(m, tp=1, dp=8, seq_len=2048, micro_batch_size=1, in_flight=4)
    assert len(w) == m.num_layers + 3
    assert w[-1] > w[1] > w[-2]          # head (fp32 logits) > block > final norm
    full = cost_weights(m, seq_len=2048, in_flight=4, checkpointing="full")
    none = cost_weights(m, seq_len=2048, in_flight=4, checkpointing="none")
    assert full[1] < none[1]
    assert parameter_weights(m, tp=2)[1] < parameter_weights(m, tp=1)[1]
