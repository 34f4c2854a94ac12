"""The parameter table: every tensor of the model, where it lives and how it is split.

One row per parameter of the TP = 1 model, computed from the ``ModelConfig`` alone (nothing is
allocated), in pipeline order. It is what converters, resharding and DeepSpeed metadata agree on:

* ``name``: the global name, e.g. ``layers.3.mlp.down.weight``; it is also the parameter's name
  inside the PP = 1 engine (``LlamaModel``), whose DeepSpeed checkpoint keys are these names;
* ``layer``: index of its pipeline layer in ``[embedding, block x L, final norm, head]``
  (DeepSpeed's ``PipelineModule`` names the parameter ``f"{layer}.{local}"`` and saves each layer
  to ``layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt``);
* ``local``: its name inside that layer (``mlp.down.weight``);
* ``shape``: full (TP = 1) shape, the vocabulary padded for the TP size the table was made for;
* ``split``: how TP ranks divide it (``layout.SPLITS``; ``layout.shard`` / ``layout.unshard``);
* ``pipe_copy``: with tied embeddings, the PipelineModule name of the LM head's copy of the
  embedding weight, ``f"{L+2}.output.weight"`` (saved in the head's layer file, always equal to
  the embedding's: ``pipelines/tied.py``). The weight is still ONE row named
  ``embedding.word_embeddings.weight``: read either copy, write both. None for other rows.

The table is checked against the real model's ``named_parameters`` (names, ``full_shape``,
``tp_split``) in tests, so it cannot drift from the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_llama.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ParamInfo:
    name: str
    layer: int
    local: str
    shape: tuple[int, ...]
    split: str
    pipe_copy: Optional[str] = None

    @property
    def pipe_name(self) -> str:
        """Its name inside DeepSpeed's PipelineModule."""
        return f"{self.layer}.{self.local}"

    @property
    def vocab_rows(self) -> bool:
        """Rows are token ids (padding rows past the real vocabulary may exist)."""
        return self.split == "vocab"


def _layer_params(cfg: ModelConfig, tp: int) -> list[tuple[str, list[tuple[str, tuple[int, ...], str]]]]:
    d, f, h = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    vocab = cfg.padded_vocab_size(tp)
    qkv_rows = cfg.num_kv_heads * (cfg.num_attention_heads // cfg.num_kv_heads + 2) * h
    embedding = [("word_embeddings.weight", (vocab, d), "vocab")]
    if cfg.embedding_layernorm:
        embedding += [("norm.weight", (d,), "replicated"), ("norm.bias", (d,), "replicated")]
    block = [("input_norm.weight", (d,), "replicated"),
             ("attention.qkv.weight", (qkv_rows, d), "rows")]
    if cfg.qkv_bias:
        block.append(("attention.qkv.bias", (qkv_rows,), "rows"))
    block += [("attention.proj.weight", (d, cfg.num_attention_heads * h), "cols"),
              ("post_attention_norm.weight", (d,), "replicated"),
              ("mlp.gate_up.weight", (2 * f, d), "gate_up"),
              ("mlp.down.weight", (d, f), "cols")]
    if cfg.head == "score":  # a reward model: LlamaForSequenceClassification's score.weight, replicated
        head = [("score.weight", (1, d), "replicated")]
    else:
        head = [] if cfg.tie_embeddings else [("output.weight", (vocab, d), "vocab")]
    return ([("embedding", embedding)] + [(f"layers.{i}", block) for i in range(cfg.num_layers)]
            + [("final_norm", [("norm.weight", (d,), "replicated")]), ("head", head)])


def param_table(cfg: ModelConfig, tp: int = 1) -> list[ParamInfo]:
    """Every parameter of the model in pipeline order (see the module doc). With tied embeddings
    the head has no weight of its own (it reads ``embedding.word_embeddings.weight``; under
    pipeline parallelism the head's copy is that row's ``pipe_copy``)."""
    rows = []
    head_layer = cfg.num_layers + 2
    for layer, (prefix, params) in enumerate(_layer_params(cfg, tp)):
        for local, shape, split in params:
            copy = None
            if cfg.tie_embeddings and cfg.head == "lm" and layer == 0 and local == "word_embeddings.weight":
                copy = f"{head_layer}.output.weight"
            rows.append(ParamInfo(f"{prefix}.{local}", layer, local, shape, split, copy))
    return rows


def pipeline_names(cfg: ModelConfig, tp: int = 1) -> dict[str, ParamInfo]:
    """Every tensor name of DeepSpeed's PipelineModule (``pipe_name`` and ``pipe_copy``) -> its row."""
    out = {}
    for p in param_table(cfg, tp):
        out[p.pipe_name] = p
        if p.pipe_copy:
            out[p.pipe_copy] = p
    return out


def param_index(cfg: ModelConfig, tp: int = 1) -> dict[str, ParamInfo]:
    """``param_table`` keyed by global name."""
    return {p.name: p for p in param_table(cfg, tp)}


def check_key_set(have: set[str], want: set[str], what: str) -> None:
    """Strict key sets: a missing or unexpected tensor is an error that names it."""
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {', '.join(extra[:3])}")
        raise ConfigError(f"{what}: " + "; ".join(parts))
