"""Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` names and layouts <-> ours.

Both sides are *full* (TP = 1) tensors; TP slicing is ``layout.shard``. HF keeps q, k, v
and gate, up as separate matrices; we fuse them (see ``layout.py`` for the row orders) and
pad the vocabulary rows to a multiple of TP. HF's rotary convention ("rotate half") is the
one our model uses, so no q/k row permutation is needed (Meta's original checkpoints do
need one: that belongs to the Meta converter).

The mapping works one pipeline layer at a time (``embedding``, ``layers.i``, ``final_norm``,
``head``: ``model.llama.layer_names``) so converters can stream: ``hf_keys`` says which HF
tensors a layer needs, ``layer_hf_to_native`` / ``layer_native_to_hf`` convert just those.
A tied model's head has no tensor on either side (HF ties ``lm_head`` to the embedding).
"""
from __future__ import annotations

from typing import Mapping

import torch

from megatron_llama.config import ModelConfig

from .layout import qkv_group_order

_BLOCK = {"input_norm.weight": "input_layernorm.weight", "attention.proj.weight": "self_attn.o_proj.weight",
          "post_attention_norm.weight": "post_attention_layernorm.weight", "mlp.down.weight": "mlp.down_proj.weight"}


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], dim=0)


def hf_keys(cfg: ModelConfig, layer: str) -> list[str]:
    """The HF tensor names that pipeline layer ``layer`` is made of."""
    if layer == "embedding":
        return ["model.embed_tokens.weight"]
    if layer == "final_norm":
        return ["model.norm.weight"]
    if layer == "head":
        if cfg.head == "score":  # LlamaForSequenceClassification, one label
            return ["score.weight"]
        return [] if cfg.tie_embeddings else ["lm_head.weight"]
    p = f"model.{layer}."
    keys = [p + v for v in _BLOCK.values()] + [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
    if cfg.qkv_bias:
        keys += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
    return keys + [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]


def layer_hf_to_native(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, layer: str, tp: int = 1
                       ) -> dict[str, torch.Tensor]:
    """HF tensors of one pipeline layer -> our full tensors of it (vocab padded for ``tp``)."""
    vocab = cfg.padded_vocab_size(tp)
    if layer == "embedding":
        return {"embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], vocab)}
    if layer == "final_norm":
        return {"final_norm.norm.weight": hf["model.norm.weight"]}
    if layer == "head":
        if cfg.head == "score":
            return {"head.score.weight": hf["score.weight"]}
        return {} if cfg.tie_embeddings else {"head.output.weight": _pad_rows(hf["lm_head.weight"], vocab)}
    perm = qkv_group_order(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
    src, dst = f"model.{layer}.", f"{layer}."
    out = {dst + ours: hf[src + theirs] for ours, theirs in _BLOCK.items()}
    out[dst + "attention.qkv.weight"] = torch.cat([hf[src + f"self_attn.{n}_proj.weight"] for n in "qkv"])[perm]
    if cfg.qkv_bias:
        out[dst + "attention.qkv.bias"] = torch.cat([hf[src + f"self_attn.{n}_proj.bias"] for n in "qkv"])[perm]
    out[dst + "mlp.gate_up.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
    return out


def layer_native_to_hf(native: Mapping[str, torch.Tensor], cfg: ModelConfig, layer: str) -> dict[str, torch.Tensor]:
    """Our full tensors of one pipeline layer -> HF tensors (vocab padding dropped; a tied head
    gives nothing: HF re-ties ``lm_head`` to the embedding when it loads)."""
    v = cfg.vocab_size
    if layer == "embedding":
        return {"model.embed_tokens.weight": native["embedding.word_embeddings.weight"][:v]}
    if layer == "final_norm":
        return {"model.norm.weight": native["final_norm.norm.weight"]}
    if layer == "head":
        if cfg.head == "score":
            return {"score.weight": native["head.score.weight"]}
        return {} if cfg.tie_embeddings else {"lm_head.weight": native["head.output.weight"][:v]}
    perm = qkv_group_order(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    sizes = [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    src, dst = f"{layer}.", f"model.{layer}."
    out = {dst + theirs: native[src + ours] for ours, theirs in _BLOCK.items()}
    for n, t in zip("qkv", native[src + "attention.qkv.weight"][inverse].split(sizes)):
        out[dst + f"self_attn.{n}_proj.weight"] = t
    if cfg.qkv_bias:
        for n, t in zip("qkv", native[src + "attention.qkv.bias"][inverse].split(sizes)):
            out[dst + f"self_attn.{n}_proj.bias"] = t
    gate, up = native[src + "mlp.gate_up.weight"].chunk(2, dim=0)
    out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return out


def _layers(cfg: ModelConfig) -> list[str]:
    return ["embedding"] + [f"layers.{i}" for i in range(cfg.num_layers)] + ["final_norm", "head"]


def hf_to_native(hf: dict[str, torch.Tensor], cfg: ModelConfig, tp: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict -> our full state dict (vocab padded for ``tp``)."""
    return {k: t for layer in _layers(cfg) for k, t in layer_hf_to_native(hf, cfg, layer, tp).items()}


def native_to_hf(native: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF state dict (vocab padding dropped). With tied embeddings
    ``lm_head.weight`` is the embedding (for comparing gradients with a tied HF model)."""
    out = {k: t for layer in _layers(cfg) for k, t in layer_native_to_hf(native, cfg, layer).items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` / ``Qwen2Config`` of the same shape."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_kv_heads,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
