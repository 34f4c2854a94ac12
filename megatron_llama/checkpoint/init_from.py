"""``train.init_from``: start a run from converted or published weights (weights only).

``train.init_from=hf:DIR`` reads a Hugging Face directory; ``train.init_from=PATH`` a native checkpoint
(a step directory or a run directory's ``latest``; any TP x PP x DP it was saved at, e.g. the output
of ``mllama-convert hf-to-native``). The weights are copied into the freshly built model *before*
DeepSpeed wraps it, so ZeRO's fp32 master copies start from them; the optimizer is new and the run
starts at step 0. It applies only when the run does not resume from its own ``train.save_dir``.

Each rank reads only its own slices: from safetensors with ``get_slice`` (rows / columns of this
TP rank, whole KV groups of the fused QKV), from a native checkpoint saved at the same TP its own
rank's shard files (any other TP: the layer's shards, unsharded and re-sliced), and only the
layers of its own pipeline stage.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_llama.config import ConfigError, ModelConfig
from megatron_llama.model.layout import qkv_group_order, shard

from .params import ParamInfo, param_table, pipeline_names


def describe_source(spec: str) -> str:
    return f"Hugging Face directory {spec[3:]}" if spec.startswith("hf:") else f"native checkpoint {spec}"


def _same_shape(have: ModelConfig, want: ModelConfig, where: str) -> None:
    fields = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
              "qkv_bias", "tie_embeddings", "embedding_layernorm")
    diff = [f"{f}={getattr(have, f)} (run: {getattr(want, f)})" for f in fields if getattr(have, f) != getattr(want, f)]
    if diff:
        raise ConfigError(f"train.init_from={where} holds a different model shape: {', '.join(diff)}; set the run's "
                          "model section to match it")


def _rows(n: int, rank: int, size: int) -> slice:
    return slice(rank * n // size, (rank + 1) * n // size)


def _check_heads(source: ModelConfig, run: ModelConfig, where: str) -> bool:
    """Whether the source's head is loaded: an LM head is not a score head (a reward run from an
    SFT / pretrained model keeps its seeded score head, model/score_head.py); a reward model cannot
    start an LM run."""
    if source.head == "score" and run.head == "lm":
        raise ConfigError(f"train.init_from={where} is a reward model (a scalar score head, no LM head): it cannot "
                          "start a language-model run; pass an SFT or pretrained checkpoint")
    return source.head == run.head


def source_head(spec: str) -> str:
    """The head of the model in ``spec`` ("lm" or "score"), read from its config alone."""
    if spec.startswith("hf:"):
        from .hf_source import hf_model_config
        return hf_model_config(spec[3:]).head
    from .native_weights import open_native
    return open_native(spec).model.head


class _HFShards:
    def __init__(self, directory: str, cfg: ModelConfig):
        from .hf_source import HFWeights, check_hf_keys, hf_model_config
        source = hf_model_config(directory)
        _same_shape(source, cfg, "hf:" + directory)
        self.head = _check_heads(source, cfg, "hf:" + directory)
        self.w = HFWeights(directory)
        check_hf_keys(self.w, source)
        self.cfg = cfg

    def read(self, p: ParamInfo, rank: int, tp: int) -> torch.Tensor:
        c, w = self.cfg, self.w
        from .native_weights import pipeline_layers
        layer, local = pipeline_layers(c)[p.layer], p.local
        if p.split == "vocab":
            key = "model.embed_tokens.weight" if p.name.startswith("embedding") else "lm_head.weight"
            per = p.shape[0] // tp
            lo, hi = rank * per, min((rank + 1) * per, c.vocab_size)
            t = w.get(key, (slice(lo, hi),)) if hi > lo else torch.empty(0, p.shape[1])
            return torch.cat([t, t.new_zeros(per - t.shape[0], p.shape[1])]) if t.shape[0] < per else t
        if p.name == "head.score.weight":
            return w.get("score.weight")
        if p.split == "replicated":  # norms
            from megatron_llama.model.hf_mapping import _BLOCK
            key = "model.norm.weight" if p.name.startswith("final_norm") else f"model.{layer}.{_BLOCK[local]}"
            return w.get(key)
        src = f"model.{layer}."
        if p.split == "cols":
            key = src + ("self_attn.o_proj.weight" if "attention" in local else "mlp.down_proj.weight")
            return w.get(key, (slice(None), _rows(p.shape[1], rank, tp)))
        if p.split == "gate_up":
            f = c.ffn_hidden_size
            return torch.cat([w.get(src + f"mlp.{n}_proj.weight", (_rows(f, rank, tp),)) for n in ("gate", "up")])
        # rows: the fused QKV of this rank's whole KV groups
        h, groups = c.head_dim, c.num_kv_heads
        q_per = c.num_attention_heads // groups
        g = _rows(groups, rank, tp)
        kind = "weight" if local.endswith("weight") else "bias"
        parts = [w.get(src + f"self_attn.q_proj.{kind}", (slice(g.start * q_per * h, g.stop * q_per * h),)),
                 w.get(src + f"self_attn.k_proj.{kind}", (slice(g.start * h, g.stop * h),)),
                 w.get(src + f"self_attn.v_proj.{kind}", (slice(g.start * h, g.stop * h),))]
        return torch.cat(parts)[qkv_group_order(c.num_attention_heads // tp, groups // tp, h)]


class _NativeShards:
    def __init__(self, path: str, cfg: ModelConfig):
        from .native_weights import open_native
        self.ck = open_native(path)
        _same_shape(self.ck.model, cfg, path)
        self.head = _check_heads(self.ck.model, cfg, path)
        self._layer: tuple[int, list] | None = None

    def read(self, p: ParamInfo, rank: int, tp: int) -> torch.Tensor:
        from megatron_llama.model.layout import unshard
        from .native_weights import repad_vocab
        if self._layer is None or self._layer[0] != p.layer:  # the files of one layer are read once
            shards = [self.ck.rank_shard(p.layer, rank)] if self.ck.tp == tp else self.ck.layer_shards(p.layer)
            self._layer = (p.layer, shards)
        shards = self._layer[1]
        if self.ck.tp == tp:  # saved at this TP: this rank's own shard as it is
            return shards[0][p.name]
        full = unshard([s[p.name] for s in shards], p.split)
        if p.vocab_rows:
            full = repad_vocab(full, p.shape[0])
        return shard(full, p.split, rank, tp)


@torch.no_grad()
def load_initial_weights(module: torch.nn.Module, cfg: ModelConfig, spec: str, tp_rank: int, tp: int,
                         pipelined: bool) -> int:
    """Copy this rank's slices from ``spec`` into ``module`` (a ``LlamaModel``, or this stage of the
    ``PipelineModule`` when ``pipelined``); returns the number of tensors loaded."""
    if spec.startswith("hf:"):
        source = _HFShards(spec[3:], cfg)
    else:
        if not Path(spec).exists():
            raise ConfigError(f"train.init_from={spec} does not exist: pass a native checkpoint or hf:DIR")
        source = _NativeShards(spec, cfg)
    # pipelined: DeepSpeed's names, incl. a tied head's copy of the embedding (its row's pipe_copy)
    by_name = pipeline_names(cfg, tp) if pipelined else {p.name: p for p in param_table(cfg, tp)}
    n = 0
    for name, param in module.named_parameters():
        p = by_name.get(name)
        if p is None:
            raise ConfigError(f"train.init_from: the model has a parameter {name} the parameter table does not know")
        if p.name == "head.score.weight" and not source.head:
            continue  # an LM source: the reward head keeps its seeded initialisation
        t = source.read(p, tp_rank, tp)
        if tuple(t.shape) != tuple(param.shape):
            raise ConfigError(f"train.init_from={spec}: {p.name} has shape {tuple(t.shape)} for TP rank {tp_rank}, "
                              f"the model wants {tuple(param.shape)}")
        param.copy_(t.to(param.dtype))
        n += 1
    return n
