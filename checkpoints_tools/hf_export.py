"""Write a Hugging Face model directory from a stream of our full (TP = 1) layers.

Output: ``model-0000i-of-0000N.safetensors`` (``metadata={"format": "pt"}``) cut at
``max_shard_bytes``, ``model.safetensors.index.json`` with ``total_size``, ``config.json``,
``generation_config.json`` and, given a SentencePiece ``tokenizer.model``, the tokenizer files
(``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``) so that
``AutoTokenizer`` and ``LlamaForCausalLM.from_pretrained`` both load the directory. The shard plan
is made from the shapes alone, so each shard is written as soon as its last tensor arrives: one
layer plus one output shard in memory at a time.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_llama.config import ConfigError, ModelConfig
from megatron_llama.model.hf_mapping import hf_config_kwargs, hf_keys, layer_native_to_hf
from megatron_llama.checkpoint.native_weights import pipeline_layers


def hf_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor name with its shape, in file order."""
    d, h = cfg.hidden_size, cfg.head_dim
    q, kv, f = cfg.num_attention_heads * h, cfg.num_kv_heads * h, cfg.ffn_hidden_size
    shape = {"embed_tokens.weight": (cfg.vocab_size, d), "lm_head.weight": (cfg.vocab_size, d), "score.weight": (1, d),
             "q_proj.weight": (q, d), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d), "q_proj.bias": (q,),
             "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (d, q), "gate_proj.weight": (f, d),
             "up_proj.weight": (f, d), "down_proj.weight": (d, f), "norm.weight": (d,), "layernorm.weight": (d,)}
    out = []
    for layer in pipeline_layers(cfg):
        for k in hf_keys(cfg, layer):
            out.append((k, next(s for suffix, s in shape.items() if k.endswith(suffix))))
    return out


def plan_shards(cfg: ModelConfig, dtype: torch.dtype, max_shard_bytes: int) -> dict[str, str]:
    """tensor name -> file name, tensors kept in order, a new file when ``max_shard_bytes`` would be passed."""
    size = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in hf_shapes(cfg):
        n = size * int(torch.Size(shape).numel())
        if groups[-1] and used + n > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    if len(groups) == 1:
        return {k: "model.safetensors" for k in groups[0]}
    total = len(groups)
    return {k: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, g in enumerate(groups) for k in g}


def write_hf(out: Path, cfg: ModelConfig, layers: Iterable[tuple[str, dict[str, torch.Tensor]]], dtype: torch.dtype,
             max_shard_bytes: int = 10 ** 9, on_layer=None) -> dict:
    """Write the weights (streamed) and ``config.json``; returns the index written."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(cfg, dtype, max_shard_bytes)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    remaining = {f: sum(1 for v in plan.values() if v == f) for f in set(plan.values())}
    total = 0
    for name, ours in layers:
        hf = layer_native_to_hf(ours, cfg, name)
        for k, t in hf.items():
            f = plan[k]
            t = t.to(dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view (q of the fused qkv, ...): safetensors refuses shared storage
            total += t.numel() * t.element_size()
            pending.setdefault(f, {})[k] = t
            remaining[f] -= 1
            if remaining[f] == 0:
                save_file(pending.pop(f), str(out / f), metadata={"format": "pt"})
        if on_layer is not None:
            on_layer(name, hf)
    assert not pending, sorted(pending)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(plan.items()))}
    if len(set(plan.values())) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_hf_config(out, cfg, dtype)
    return index


def write_hf_config(out: Path, cfg: ModelConfig, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2) -> None:
    arch = ("Qwen2" if cfg.qkv_bias else "Llama") + ("ForSequenceClassification" if cfg.head == "score"
                                                      else "ForCausalLM")
    if cfg.embedding_layernorm:
        raise ConfigError("model.embedding_layernorm=true (BLOOM's embedding LayerNorm) has no LLaMA equivalent in "
                          "transformers: this model cannot be exported to HF")
    conf = {"architectures": [arch], "model_type": "qwen2" if cfg.qkv_bias else "llama",
            **hf_config_kwargs(cfg), "hidden_act": "silu", "initializer_range": cfg.init_std,
            "attention_bias": cfg.qkv_bias, "mlp_bias": False, "head_dim": cfg.head_dim,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
            "torch_dtype": str(dtype).replace("torch.", "")}
    if cfg.head == "score":  # a reward model: one scalar label (model/score_head.py)
        conf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _name_scoring_pad(out: Path, tok, tokenizer_conf: dict, special: dict) -> None:
    """A reward model (``*ForSequenceClassification``) scores the last token that is not
    ``pad_token_id``; ours scores the last token of the sequence, the answer's EOS
    (model/score_head.py). So the pad token must be one that never ends a sequence and differs
    from EOS: SentencePiece's ``<unk>`` (byte fallback never emits it). Padded batches
    (``tokenizer(..., padding=True)``, left or right) then score exactly as ours."""
    path = out / "config.json"
    c = json.loads(path.read_text())
    if not c["architectures"][0].endswith("ForSequenceClassification"):
        return
    if tok.unk_id < 0 or tok.unk_id == tok.eos_id:
        raise ConfigError(f"tokenizer {tok.path} has no <unk> piece distinct from EOS to pad with: a reward model "
                          "export needs one (HF scores the last non-pad token)")
    c["pad_token_id"] = tok.unk_id
    path.write_text(json.dumps(c, indent=2) + "\n")
    tokenizer_conf["pad_token"] = special["pad_token"] = tok.sp.id_to_piece(tok.unk_id)


def write_tokenizer(out: Path, tokenizer_model: Optional[str], max_len: int,
                    extra: Optional[dict] = None) -> Optional[str]:
    """Copy a SentencePiece model and write the HF tokenizer files; returns a description or None.
    ``extra``: further tokenizer_config.json entries (an SFT run's ``chat_template``)."""
    if tokenizer_model is None:
        return None
    from megatron_llama.data.tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer_model)
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    piece = tok.sp.id_to_piece
    special = {"bos_token": piece(tok.bos_id) if tok.bos_id >= 0 else None,
               "eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id) if tok.unk_id >= 0 else None}
    special = {k: v for k, v in special.items() if v is not None}
    conf = {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": True,
            "add_eos_token": False, "model_max_length": max_len, "clean_up_tokenization_spaces": False,
            "legacy": False, "sp_model_kwargs": {}, **(extra or {})}
    # generation_config / config.json carry the tokenizer's real BOS/EOS ids
    for name in ("config.json", "generation_config.json"):
        p = out / name
        c = json.loads(p.read_text())
        c.update(bos_token_id=tok.bos_id if tok.bos_id >= 0 else None, eos_token_id=tok.eos_id)
        p.write_text(json.dumps(c, indent=2) + "\n")
    _name_scoring_pad(out, tok, conf, special)
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tok.describe()
