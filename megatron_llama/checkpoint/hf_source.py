"""A Hugging Face model directory as a weight source, streamed one tensor at a time.

Reads ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` without
sliding window) into a ``ModelConfig``, and tensors from ``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json`` (the q, k, v of one layer may sit in different
files), or ``pytorch_model*.bin`` (``torch.load(mmap=True)``). Safetensors are opened with
``safe_open`` and read with ``get_slice``, so only the requested tensor (or rows of it) is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_llama.config import ConfigError, ModelConfig
from megatron_llama.model.hf_mapping import hf_keys, layer_hf_to_native

from .params import check_key_set
from .native_weights import pipeline_layers

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                 "LlamaForSequenceClassification", "Qwen2ForSequenceClassification")


def hf_model_config(hf_dir: str | os.PathLike, name: str = "hf") -> ModelConfig:
    """``ModelConfig`` of an HF LLaMA-family ``config.json``; unsupported variants are a ConfigError."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} has no config.json: pass a Hugging Face model directory "
                          "(save_pretrained output)")
    try:
        c = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): restore it from the model's source") from None
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES or not isinstance(c.get("hidden_size"), int):
        raise ConfigError(f"{hf_dir} is not a LLaMA-family checkpoint (architectures: {arch}): supported are "
                          f"{', '.join(ARCHITECTURES)}")
    if c.get("rope_scaling"):
        raise ConfigError(f"{path}: rope_scaling {c['rope_scaling']} is not supported by our model yet: "
                          "convert a checkpoint without it")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ConfigError(f"{path}: head_dim {c['head_dim']} != hidden_size / num_attention_heads: not supported")
    if arch == "MistralForCausalLM" and c.get("sliding_window"):
        raise ConfigError(f"{path}: sliding-window attention is not supported: set sliding_window to null")
    qkv_bias = arch.startswith("Qwen2") or bool(c.get("attention_bias", False))
    head = "score" if arch.endswith("ForSequenceClassification") else "lm"
    if head == "score" and (c.get("num_labels") or len(c.get("id2label") or {0: 0})) != 1:
        raise ConfigError(f"{path}: a sequence classifier with {len(c['id2label'])} labels is not a reward model: "
                          "only one label (a scalar score) is supported")
    if c.get("mlp_bias"):
        raise ConfigError(f"{path}: mlp_bias=true is not supported (LLaMA MLPs have no bias)")
    return ModelConfig(name=name, hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                       num_attention_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
                       ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                       max_seq_len=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=float(c.get("rope_theta", 10000.0)), qkv_bias=qkv_bias,
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)) and head == "lm", head=head)


class HFWeights:
    """Tensors of an HF directory by name, read lazily; ``names`` lists them all."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self.where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        index = next((self.dir / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if (self.dir / n).is_file()), None)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConfigError(f"{index} is damaged ({e!s:.60}): restore it from the model's source") from None
            self.where = {k: self.dir / f for k, f in weight_map.items()}
            for f in sorted(set(self.where.values())):
                if not f.is_file():
                    raise ConfigError(f"{self.dir}: shard {f.name} named by {index.name} is missing: download it "
                                      "again")
        else:
            files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
            if not files:
                raise ConfigError(f"{self.dir} has no weights (*.safetensors or pytorch_model*.bin): pass a "
                                  "Hugging Face model directory")
            for f in files:
                for k in self._keys(f):
                    self.where[k] = f

    @property
    def names(self) -> set[str]:
        return set(self.where)

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[f] = safe_open(str(f), framework="pt")
                else:
                    self._open[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise ConfigError(f"{f} is damaged or not a weight file ({str(e).splitlines()[0][:100]}): "
                                  "download it again") from None
        return self._open[f]

    def _keys(self, f: Path) -> list[str]:
        h = self._handle(f)
        return list(h.keys())

    def get(self, name: str, rows: Optional[tuple] = None) -> torch.Tensor:
        """Tensor ``name``, or only the index ``rows`` of it (a tuple of slices, e.g. ``(slice(0, 8),)`` for
        rows, ``(slice(None), slice(0, 8))`` for columns); read from disk now."""
        f = self.where[name]
        h = self._handle(f)
        try:
            if f.suffix == ".safetensors":
                return h.get_slice(name)[rows] if rows is not None else h.get_tensor(name)
            t = h[name]
            return (t[rows] if rows is not None else t).clone()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{f}: tensor {name} cannot be read ({str(e).splitlines()[0][:100]}): the file is "
                              "damaged; download it again") from None

    def close(self) -> None:
        self._open.clear()


def check_hf_keys(weights: HFWeights, cfg: ModelConfig) -> None:
    """Strict key set (HF's rotary ``inv_freq`` buffers and a tied model's ``lm_head`` are allowed)."""
    want = {k for layer in pipeline_layers(cfg) for k in hf_keys(cfg, layer)}
    have = {k for k in weights.names if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings or cfg.head == "score":
        have.discard("lm_head.weight")
    check_key_set(have, want, f"{weights.dir}")


def hf_layers(weights: HFWeights, cfg: ModelConfig, tp: int, dtype: Optional[torch.dtype] = None
              ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(layer name, our full tensors)`` per pipeline layer, vocabulary padded for ``tp``; one layer read at a
    time. Shapes are checked against ``cfg`` (a mismatch names the tensor)."""
    from .params import param_index
    index = param_index(cfg, tp)
    for layer in pipeline_layers(cfg):
        hf = {k: weights.get(k) for k in hf_keys(cfg, layer)}
        _check_hf_shapes(hf, cfg)
        ours = layer_hf_to_native(hf, cfg, layer, tp)
        for k, t in ours.items():
            if tuple(t.shape) != index[k].shape:
                raise ConfigError(f"{k}: shape {tuple(t.shape)} disagrees with config.json ({index[k].shape})")
        del hf
        weights.close()  # unmap what was read: file pages must not pile up in RSS layer after layer
        yield layer, {k: (t.to(dtype) if dtype is not None else t) for k, t in ours.items()}


def _check_hf_shapes(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    d, h = cfg.hidden_size, cfg.head_dim
    kv, f = cfg.num_kv_heads * h, cfg.ffn_hidden_size
    expect = {"embed_tokens.weight": (cfg.vocab_size, d), "lm_head.weight": (cfg.vocab_size, d), "score.weight": (1, d),
              "q_proj.weight": (cfg.num_attention_heads * h, d), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d),
              "q_proj.bias": (cfg.num_attention_heads * h,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
              "o_proj.weight": (d, cfg.num_attention_heads * h), "gate_proj.weight": (f, d), "up_proj.weight": (f, d),
              "down_proj.weight": (d, f), "norm.weight": (d,), "layernorm.weight": (d,)}
    for k, t in hf.items():
        want = next((s for suffix, s in expect.items() if k.endswith(suffix)), None)
        if want is not None and tuple(t.shape) != want:
            raise ConfigError(f"{k} has shape {tuple(t.shape)} but config.json implies {want}: the weights and "
                              "config.json disagree")
