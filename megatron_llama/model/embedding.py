"""Token embedding (vocab-parallel), optionally followed by LayerNorm (BLOOM)."""
from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megatron_llama.config import ModelConfig

from .layout import mark
from .norm import LayerNorm


class Embedding(torch.nn.Module):
    """tokens [b, s] int64 -> hidden [s, b, d]. Each TP rank holds V_padded/tp rows; the
    lookup is masked per rank and summed over TP inside megatron-core."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        vocab = cfg.padded_vocab_size(tp)
        self.word_embeddings = VocabParallelEmbedding(vocab, cfg.hidden_size, init_method=lambda w: w,
                                                      config=mp, tp_group=tp_group)
        mark(self.word_embeddings.weight, "vocab", (vocab, cfg.hidden_size))
        self.norm = None
        if cfg.embedding_layernorm:
            device = "cpu" if mp.use_cpu_initialization else torch.cuda.current_device()
            self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=mp.params_dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(tokens).transpose(0, 1).contiguous()
        return self.norm(h) if self.norm is not None else h
