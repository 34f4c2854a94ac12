"""The LLaMA model as a DeepSpeed ``PipelineModule``: ``[embedding, block x L, final norm, head]``.

Each layer is a ``LayerSpec`` of a thin ``*Pipe`` wrapper around the model's own layer; a stage
builds only its own layers, and each is initialised from its *global* name exactly as
``LlamaModel`` does, so every TP x PP layout starts from the same weights.

Activation contract between stages: a 1-tuple ``(hidden,)`` with hidden of the fixed shape
[seq, micro_batch, hidden] (no dynamic shapes; DeepSpeed sends the shapes once); with sequence
parallelism each TP rank sends its own [seq/tp, micro_batch, hidden] slice whole
(``engine.pipe_partitioning``), while SFT's segments stay [b, s] on every rank. The first stage
reads ``tokens`` [b, s] and the last stage ``labels`` [b, s] from the same data iterator
(DeepSpeed's pipeline data contract: items are ``(inputs, labels)``); the loss is megatron-core's
vocab-parallel cross entropy on the last stage, logits never gathered.
SFT (packed samples): inputs are ``(tokens, segments)``, activations ``(hidden, segments)``
(segments [b, s] int64, no gradient, so attention stays inside each sample on every stage),
labels ``(labels, token weights)``.
Preference pairs (``train.objective`` reward / dpo; the micro-batch contract is in
``megatron_llama/data/preference_dataset.py``): inputs ``tokens`` [2P, s] (one sample per row, plain
causal attention, so activations stay ``(hidden,)``), labels ``(labels, loss_mask, margin,
pair_index)``; the last layer is the objective's head (reward: ``ScoreHeadPipe``) and ``loss_fn``
the objective's loss (pipelines/objectives.py).

Activation checkpointing is done inside ``TransformerBlock`` (none / selective / full), never by
DeepSpeed's ``activation_checkpoint_interval``, which would also checkpoint the embedding.
Stage boundaries come from ``balance.py`` (DeepSpeed has no "custom" partition method, so
``LlamaPipeline`` overrides ``_partition_layers``).
"""
from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from megatron.core import parallel_state

from megatron_llama.config import RunConfig
from megatron_llama.model import Embedding, FinalNorm, LMHead, TransformerBlock, layer_names, lm_loss
from megatron_llama.model.init import initialize_module
from megatron_llama.model.score_head import ScoreHead
from megatron_llama.model.tp_config import megatron_config

from .balance import blocks_per_stage, stage_boundaries
from .compile_policy import use_compile
from .tied import mark_head_copy, tied_comms, tied_weights_and_groups


def _hidden(x):
    """Activations arrive as a 1-tuple, or as the bare tensor when DeepSpeed unwrapped it."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _build_args(cfg: RunConfig, dtype: torch.dtype, device: torch.device):
    mp = megatron_config(cfg.parallel, dtype, device)
    return mp, parallel_state.get_tensor_model_parallel_group()


def _init(module: torch.nn.Module, name: str, cfg: RunConfig) -> None:
    initialize_module(module, name, cfg.model, cfg.train.seed,
                      parallel_state.get_tensor_model_parallel_rank(), cfg.parallel.tp)


class EmbeddingPipe(Embedding):
    def __init__(self, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
        mp, group = _build_args(cfg, dtype, device)
        super().__init__(cfg.model, mp, group)
        _init(self, "embedding", cfg)

    def forward(self, tokens):
        if isinstance(tokens, (tuple, list)) and len(tokens) == 2:  # SFT: (tokens, segments)
            return (super().forward(tokens[0]), tokens[1])
        return (super().forward(_hidden(tokens)),)


class TransformerBlockPipe(TransformerBlock):
    def __init__(self, index: int, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
        mp, group = _build_args(cfg, dtype, device)
        super().__init__(cfg.model, mp, group, cfg.parallel.activation_checkpointing,
                         compile=use_compile(cfg, device))
        _init(self, f"layers.{index}", cfg)

    def forward(self, x):
        if isinstance(x, (tuple, list)) and len(x) == 2:  # SFT: segments travel with the hidden state
            return (super().forward(x[0], x[1]), x[1])
        return (super().forward(_hidden(x)),)


class FinalNormPipe(FinalNorm):
    def __init__(self, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
        mp, group = _build_args(cfg, dtype, device)
        super().__init__(cfg.model, mp, group)
        _init(self, "final_norm", cfg)

    def forward(self, x):
        return (super().forward(_hidden(x)),)


class LMHeadPipe(LMHead):
    """With tied embeddings the head holds its own copy of the embedding weight (``tied.py``)."""

    def __init__(self, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
        mp, group = _build_args(cfg, dtype, device)
        super().__init__(cfg.model, mp, group)
        if cfg.model.tie_embeddings:
            mark_head_copy(self.output.weight)
        _init(self, "head", cfg)

    def forward(self, x):
        return super().forward(_hidden(x))  # logits [s, b, V/tp]: the last stage's output


class ScoreHeadPipe(ScoreHead):
    """A reward model's scalar head (model/score_head.py): hidden -> scores [s, b]."""

    def __init__(self, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
        mp, _group = _build_args(cfg, dtype, device)
        super().__init__(cfg.model, mp)
        _init(self, "head", cfg)

    def forward(self, x):
        return super().forward(_hidden(x))


def pipeline_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """loss_fn of the pipeline: mean token cross entropy, vocab-parallel. SFT's labels are
    ``(labels, token weights)`` (pipelines/token_weights.py)."""
    if isinstance(labels, (tuple, list)):
        return lm_loss(logits, labels[0], labels[1])
    return lm_loss(logits, labels)


class LlamaPipeline(PipelineModule):
    """A PipelineModule whose stage boundaries are given, not computed by DeepSpeed; with
    ``tied`` the first stage's embedding and the last stage's head copy form DeepSpeed's tied
    weight (``tied.py``) instead of a ``TiedLayerSpec``, so parameter names stay ``{layer}.{name}``."""

    def __init__(self, layers, boundaries: list[int], tied: bool = False, **kwargs):
        object.__setattr__(self, "_given_parts", list(boundaries))
        object.__setattr__(self, "_tied", tied)
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method: str = "given") -> None:
        self.parts = list(self._given_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    # DeepSpeed calls these three for tied weights (init broadcast, ReduceTiedGrads, param count)
    def _index_tied_modules(self) -> dict:
        if not self._tied:
            return {}
        first = self.forward_funcs[0] if self._local_start == 0 else None
        last = self.forward_funcs[-1] if self._local_stop == self._num_layers else None
        return tied_comms(self._topo, self.global_rank, first, last)

    def get_tied_weights_and_groups(self):
        return tied_weights_and_groups(self.tied_comms)

    def allreduce_tied_weight_gradients(self) -> None:
        for weight, group in self.get_tied_weights_and_groups():
            torch.distributed.all_reduce(weight.grad, group=group)


def layer_specs(cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> list[LayerSpec]:
    n = cfg.model.num_layers
    head = ScoreHeadPipe if cfg.model.head == "score" else LMHeadPipe
    return ([LayerSpec(EmbeddingPipe, cfg, dtype, device)]
            + [LayerSpec(TransformerBlockPipe, i, cfg, dtype, device) for i in range(n)]
            + [LayerSpec(FinalNormPipe, cfg, dtype, device), LayerSpec(head, cfg, dtype, device)])


def describe_stages(cfg: RunConfig, boundaries: list[int]) -> str:
    names = layer_names(cfg.model)
    counts = blocks_per_stage(boundaries, cfg.model.num_layers)
    parts = []
    for s, (a, b) in enumerate(zip(boundaries, boundaries[1:])):
        extra = [x for x in names[a:b] if not x.startswith("layers.")]
        blocks = f"{counts[s]} blocks" + (f" + {', '.join(extra)}" if extra else "")
        parts.append(f"stage {s}: {blocks}")
    return "; ".join(parts)


def build_pipeline_module(cfg: RunConfig, topology, dtype: torch.dtype, device: torch.device,
                          dp: int, loss_fn=pipeline_loss) -> LlamaPipeline:
    """This rank's stage of the model, as a DeepSpeed PipelineModule over ``topology``;
    ``loss_fn(last stage output, labels)`` is the objective's (pipelines/objectives.py)."""
    bounds = stage_boundaries(cfg.model, cfg.parallel, dp=dp, seq_len=cfg.data.seq_len,
                              micro_batch_size=cfg.train.micro_batch_size, bf16=dtype == torch.bfloat16)
    tied = cfg.model.tie_embeddings and cfg.model.head == "lm"
    return LlamaPipeline(layer_specs(cfg, dtype, device), bounds, tied=tied,
                         topology=topology, loss_fn=loss_fn, partition_method="given",
                         activation_checkpoint_interval=0, base_seed=cfg.train.seed)
