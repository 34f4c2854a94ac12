"""A transformer block traces into ONE torch.compile graph (megatron_llama/model/tp_linear.py):
megatron-core's row-parallel layer used to break it into 8 with a deprecation warning."""

import torch


def test_block_compiles_without_graph_breaks(single_process_model_parallel):
    from megatron_llama.config import ParallelConfig, preset
    from megatron_llama.model import LlamaModel, fp8
    from megatron_llama.model.block import _block_forward

    model = LlamaModel(preset("tiny"), ParallelConfig(), dtype=torch.float32)
    x = torch.randn(16, 2, model.cfg.hidden_size, requires_grad=True)
    # one trace covers both local matmuls: attention's bf16 (group-bound), the MLP's float8
    assert fp8.convert(model.layers[0].mlp, "tensorwise") == 2
    explained = torch._dynamo.explain(_block_forward)(model.layers[0], x)
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1
