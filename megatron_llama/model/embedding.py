"""Token embedding (vocab-parallel), optionally followed by LayerNorm (BLOOM)."""
from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megatron_llama.config import ModelConfig

from .layout import mark
from .norm import LayerNorm
from .sequence_parallel import sync_replicated_grads


class Embedding(torch.nn.Module):
    """tokens [b, s] int64 -> hidden [s, b, d]. Each TP rank holds V_padded/tp rows; the
    lookup is masked per rank and summed over TP inside megatron-core. With sequence
    parallelism the sum is a reduce-scatter and each TP rank returns its [s/tp, b, d] slice."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        vocab = cfg.padded_vocab_size(tp)
        self.sequence_parallel = mp.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(vocab, cfg.hidden_size, init_method=lambda w: w,
                                                      reduce_scatter_embeddings=mp.sequence_parallel,
                                                      config=mp, tp_group=tp_group)
        mark(self.word_embeddings.weight, "vocab", (vocab, cfg.hidden_size))
        self.norm = None
        if cfg.embedding_layernorm:
            device = "cpu" if mp.use_cpu_initialization else torch.cuda.current_device()
            self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=mp.params_dtype)
            if mp.sequence_parallel:
                sync_replicated_grads(self.norm, tp_group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(tokens)  # [b, s, d], or [s/tp, b, d] (already transposed)
        if not self.sequence_parallel:
            h = h.transpose(0, 1).contiguous()
        return self.norm(h) if self.norm is not None else h
