"""The LLaMA model as an ordered list of layers, and as one module for PP = 1.

The layer list ``[embedding, block x L, final norm, LM head]`` is what the pipeline
(``pipelines/stages.py``) splits into stages; ``LlamaModel`` is the same layers in one
``nn.Module`` for runs without pipeline parallelism and for tests.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_llama.config import ModelConfig, ParallelConfig

from .block import TransformerBlock
from .embedding import Embedding
from .head import FinalNorm, LMHead, lm_loss
from .init import initialize_module
from .score_head import ScoreHead
from .tp_config import megatron_config


def layer_names(cfg: ModelConfig) -> list[str]:
    """Global name of each pipeline layer; parameter names are ``<layer name>.<param>``."""
    return ["embedding"] + [f"layers.{i}" for i in range(cfg.num_layers)] + ["final_norm", "head"]


class LlamaModel(torch.nn.Module):
    """tokens [b, s] -> this TP rank's logits [s, b, V_padded/tp] (``model.head=score``: scores [s, b]).

    Requires megatron-core's ``parallel_state`` to be initialised (its TP group is used by
    the layers and by the vocab-parallel loss). Weights are initialised from ``seed``
    independently of TP (``init.py``).
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 1234, compile: bool = False):
        super().__init__()
        device = torch.device(device)
        mp = megatron_config(parallel, dtype, device)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.cfg = cfg
        self.embedding = Embedding(cfg, mp, tp_group)
        self.layers = torch.nn.ModuleList(
            TransformerBlock(cfg, mp, tp_group, parallel.activation_checkpointing, compile=compile)
            for _ in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg, mp, tp_group)
        if cfg.head == "score":  # a reward model (score_head.py)
            self.head = ScoreHead(cfg, mp)
        else:
            tied = (lambda: self.embedding.word_embeddings.weight) if cfg.tie_embeddings else None
            self.head = LMHead(cfg, mp, tp_group, tied_weight=tied)
        rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel.tp
        for name, layer in zip(layer_names(cfg), self.pipeline_layers()):
            initialize_module(layer, name, cfg, seed, rank, size)

    def pipeline_layers(self) -> list[torch.nn.Module]:
        return [self.embedding, *self.layers, self.final_norm, self.head]

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``segments`` [b, s]: sample number of each position of packed rows (SFT): attention
        stays inside each sample. None: plain causal attention over the whole row.
        ``labels`` [b, s]: return the mean token loss (the head's chunked loss) instead of the logits
        (LM head only: a score head's loss is its objective's, pipelines/objectives.py)."""
        h = self.embedding(tokens)
        for layer in self.layers:
            h = layer(h, segments)
        if labels is None:
            return self.head(self.final_norm(h))
        if self.cfg.head != "lm":
            raise ValueError("labels are for the LM head's loss; a score head returns scores")
        return self.head(self.final_norm(h), labels)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss(self(tokens), labels)
