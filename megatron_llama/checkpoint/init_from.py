"""``train.init_from``: start a run from converted or published weights (weights only).

``train.init_from=hf:DIR`` reads a Hugging Face directory; ``train.init_from=PATH`` a native checkpoint
(a step directory or a run directory's ``latest``; any TP x PP x DP it was saved at, e.g. the output
of ``mllama-convert hf-to-native``) or a store written by ``mllama-convert reshard`` (its fp32
master weights; its optimizer state is not used). The weights are copied into the freshly built model *before*
DeepSpeed wraps it, so ZeRO's fp32 master copies start from them; the optimizer is new and the run
starts at step 0. It applies only when the run does not resume from its own ``train.save_dir``.

Each rank reads only its own slices: from safetensors with ``get_slice`` (rows / columns of this
TP rank, whole KV groups of the fused QKV), from a native checkpoint saved at the same TP its own
rank's shard files (any other TP: the layer's shards, unsharded and re-sliced), and only the
layers of its own pipeline stage.

With a tokenizer that extends the source's (``init_tokenizer.py`` checks it), the run's
``model.vocab_size`` may exceed the source's: rows of the source's ids are copied as they are (bitwise,
at any TP), rows of the new ids start per ``train.init_new_rows`` (``mean``: the mean of the source's
rows of that matrix, Swallow's choice, so a new token starts as an "average" token rather than a
random direction that disturbs the logits of the old ones; ``zero``; ``random``: N(0, init_std), the
same draw on every rank), and the padding past the new vocabulary (``padded_vocab_size`` of the run's
TP) is zero.
"""
from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Optional

import torch

from megatron_llama.config import ConfigError, ModelConfig
from megatron_llama.model.layout import qkv_group_order, shard

from .params import ParamInfo, param_table, pipeline_names


def describe_source(spec: str) -> str:
    if spec.startswith("hf:"):
        return f"Hugging Face directory {spec[3:]}"
    from .resharded import resharded_step_dir
    return f"resharded store {spec} (its fp32 masters)" if resharded_step_dir(spec) else f"native checkpoint {spec}"


def _same_shape(have: ModelConfig, want: ModelConfig, where: str, grow_vocab: bool = False) -> None:
    fields = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
              "qkv_bias", "tie_embeddings", "embedding_layernorm", "rope_theta", "rope_scaling", "norm_eps")
    if grow_vocab and want.vocab_size > have.vocab_size:
        fields = tuple(f for f in fields if f != "vocab_size")
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
    def __init__(self, directory: str, cfg: ModelConfig, grow_vocab: bool = False):
        from .hf_source import HFWeights, check_hf_keys, hf_model_config
        src = hf_model_config(directory)
        _same_shape(src, cfg, "hf:" + directory, grow_vocab)
        self.head = _check_heads(src, cfg, "hf:" + directory)
        self.w = HFWeights(directory)
        check_hf_keys(self.w, src)
        self.cfg = dataclasses.replace(cfg, vocab_size=src.vocab_size)  # the source's rows from here on

    def vocab_rows(self, p: ParamInfo, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the source's (unpadded) embedding or head."""
        key = "model.embed_tokens.weight" if p.name.startswith("embedding") else "lm_head.weight"
        return self.w.get(key, (slice(lo, hi),)) if hi > lo else torch.empty(0, p.shape[1])

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
    def __init__(self, path: str, cfg: ModelConfig, grow_vocab: bool = False):
        from .native_weights import open_native
        self.ck = open_native(path)
        _same_shape(self.ck.model, cfg, path, grow_vocab)
        self.head = _check_heads(self.ck.model, cfg, path)
        self._layer: tuple[int, list] | None = None
        self._full: tuple[str, torch.Tensor] | None = None

    def vocab_rows(self, p: ParamInfo, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the source's (unpadded) embedding or head (its shards unsharded once)."""
        from megatron_llama.model.layout import unshard
        if self._full is None or self._full[0] != p.name:
            layer = next(q.layer for q in self.ck.table if q.name == p.name)
            full = unshard([s[p.name] for s in self.ck.layer_shards(layer)], "vocab")
            self._full = (p.name, full[:self.ck.model.vocab_size])
        return self._full[1][lo:hi]

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


class _ReshardedShards:
    """A store written by ``mllama-convert reshard`` (``resharded.py``): its fp32 master weights
    are the weights; its moments and step count are not used (init_from starts a fresh optimizer).
    Each rank reads its rows / columns of one layer file at a time with ``get_slice``."""

    def __init__(self, step_dir: Path, cfg: ModelConfig):
        import json

        from megatron_llama.config import config_from_dict

        from .directory import META
        self.dir = step_dir
        source = config_from_dict(json.loads((step_dir / META).read_text())["config"]).model
        _same_shape(source, cfg, str(step_dir))
        self.head = _check_heads(source, cfg, str(step_dir))
        self.cfg = cfg
        self._file: tuple[int, object] | None = None

    def read(self, p: ParamInfo, rank: int, tp: int) -> torch.Tensor:
        from safetensors import safe_open

        from .resharded import MASTER, layer_file, store_key
        if self._file is None or self._file[0] != p.layer:  # one layer file open at a time
            path = self.dir / layer_file(p.layer)
            if not path.is_file():
                raise ConfigError(f"train.init_from={self.dir}: {path.name} is missing: reshard again")
            self._file = (p.layer, safe_open(str(path), framework="pt"))
        t = self._file[1].get_slice(store_key(MASTER, p.name))
        rows = t.get_shape()[0]
        if p.split == "replicated" or tp == 1 and p.split != "vocab":
            return t[:]
        if p.split == "vocab":  # stored unpadded: this rank's rows, zero rows past the vocabulary
            per = p.shape[0] // tp
            lo, hi = rank * per, min((rank + 1) * per, rows)
            part = t[lo:hi] if hi > lo else torch.empty(0, p.shape[1])
            return torch.cat([part, part.new_zeros(per - part.shape[0], p.shape[1])]) if part.shape[0] < per else part
        if p.split == "rows":
            return t[_rows(rows, rank, tp)]
        if p.split == "cols":
            return t[:, _rows(t.get_shape()[1], rank, tp)]
        half = rows // 2  # gate_up: this rank's rows of the gate half, then of the up half
        g = _rows(half, rank, tp)
        return torch.cat([t[g], t[half + g.start:half + g.stop]])


class _GrownVocab:
    """A source whose vocabulary rows stop at ``old``: the run's rows of its TP rank are the source's rows,
    then new rows (``mode``), then zero padding."""

    def __init__(self, source, old: int, new: int, mode: str, seed: int, std: float):
        self.source, self.old, self.new, self.mode, self.seed, self.std = source, old, new, mode, seed, std
        self.head = source.head

    def _new_rows(self, p: ParamInfo) -> torch.Tensor:
        n, d = self.new - self.old, p.shape[1]
        if self.mode == "zero":
            return torch.zeros(n, d)
        if self.mode == "random":  # one draw per matrix, the same on every rank
            g = torch.Generator().manual_seed(self.seed + zlib.crc32(p.name.encode()))
            return torch.randn(n, d, generator=g) * self.std
        total = torch.zeros(d, dtype=torch.float64)
        for lo in range(0, self.old, 8192):  # streamed: the source's matrix is never whole in memory here
            total += self.source.vocab_rows(p, lo, min(lo + 8192, self.old)).double().sum(0)
        return (total / self.old).float().expand(n, d)

    def read(self, p: ParamInfo, rank: int, tp: int) -> torch.Tensor:
        if not p.vocab_rows:
            return self.source.read(p, rank, tp)
        per = p.shape[0] // tp
        lo, hi = rank * per, (rank + 1) * per
        old = self.source.vocab_rows(p, lo, min(hi, self.old))
        parts = [old]
        a, b = max(lo, self.old), min(hi, self.new)
        if b > a:
            parts.append(self._new_rows(p)[a - self.old:b - self.old].to(old.dtype))
        t = torch.cat(parts)
        return torch.cat([t, t.new_zeros(per - t.shape[0], p.shape[1])]) if t.shape[0] < per else t


@torch.no_grad()
def load_initial_weights(module: torch.nn.Module, cfg: ModelConfig, spec: str, tp_rank: int, tp: int,
                         pipelined: bool, source_vocab: Optional[int] = None, new_rows: str = "mean",
                         seed: int = 0) -> int:
    """Copy this rank's slices from ``spec`` into ``module`` (a ``LlamaModel``, or this stage of the
    ``PipelineModule`` when ``pipelined``); returns the number of tensors loaded. ``source_vocab`` <
    ``cfg.vocab_size`` (an extended tokenizer, checked by ``init_tokenizer.plan_init_tokenizer``): the
    vocabulary grows, new rows per ``new_rows``."""
    grow = source_vocab is not None and source_vocab < cfg.vocab_size
    if spec.startswith("hf:"):
        source = _HFShards(spec[3:], cfg, grow)
    else:
        if not Path(spec).exists():
            raise ConfigError(f"train.init_from={spec} does not exist: pass a native checkpoint or hf:DIR")
        from .resharded import resharded_step_dir
        store = resharded_step_dir(spec)
        if store is not None and grow:
            raise ConfigError(f"train.init_from={spec} is a resharded store: growing the vocabulary from one is not "
                              "supported; start from the checkpoint it was resharded from, or hf:DIR")
        source = _ReshardedShards(store, cfg) if store is not None else _NativeShards(spec, cfg, grow)
    if grow:
        source = _GrownVocab(source, source_vocab, cfg.vocab_size, new_rows, seed, cfg.init_std)
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
