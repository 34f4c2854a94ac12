"""Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` names and layouts <-> ours.

Both sides are *full* (TP = 1) state dicts; TP slicing is ``layout.shard``. HF keeps q, k, v
and gate, up as separate matrices; we fuse them (see ``layout.py`` for the row orders) and
pad the vocabulary rows to a multiple of TP. HF's rotary convention ("rotate half") is the
one our model uses, so no q/k row permutation is needed (Meta's original checkpoints do
need one: that belongs to the Meta converter).
"""
from __future__ import annotations

import torch

from megatron_llama.config import ModelConfig

from .layout import qkv_group_order


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], dim=0)


def hf_to_native(hf: dict[str, torch.Tensor], cfg: ModelConfig, tp: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict -> our full state dict (vocab padded for ``tp``)."""
    vocab = cfg.padded_vocab_size(tp)
    perm = qkv_group_order(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
    out = {"embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], vocab),
           "final_norm.norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["head.output.weight"] = _pad_rows(hf["lm_head.weight"], vocab)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        qkv = torch.cat([hf[src + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        out[dst + "attention.qkv.weight"] = qkv[perm]
        if cfg.qkv_bias:
            bias = torch.cat([hf[src + f"self_attn.{n}_proj.bias"] for n in "qkv"], dim=0)
            out[dst + "attention.qkv.bias"] = bias[perm]
        out[dst + "attention.proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.gate_up.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0)
        out[dst + "mlp.down.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "input_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "post_attention_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    return out


def native_to_hf(native: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF state dict (vocab padding dropped)."""
    v = cfg.vocab_size
    perm = qkv_group_order(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": native["embedding.word_embeddings.weight"][:v],
           "model.norm.weight": native["final_norm.norm.weight"]}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = native["head.output.weight"][:v]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, vv = native[src + "attention.qkv.weight"][inverse].split([q_rows, kv_rows, kv_rows])
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": vv})
        if cfg.qkv_bias:
            qb, kb, vb = native[src + "attention.qkv.bias"][inverse].split([q_rows, kv_rows, kv_rows])
            out.update({dst + "self_attn.q_proj.bias": qb, dst + "self_attn.k_proj.bias": kb,
                        dst + "self_attn.v_proj.bias": vb})
        out[dst + "self_attn.o_proj.weight"] = native[src + "attention.proj.weight"]
        gate, up = native[src + "mlp.gate_up.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = native[src + "mlp.down.weight"]
        out[dst + "input_layernorm.weight"] = native[src + "input_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = native[src + "post_attention_norm.weight"]
    return out


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` / ``Qwen2Config`` of the same shape."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_kv_heads,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
