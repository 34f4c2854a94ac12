"""Meta's original LLaMA / Llama 2 checkpoints: ``params.json`` + ``consolidated.NN.pth`` (one per MP rank).

How Meta splits tensors over its model-parallel shards: ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` and
``output`` on dim 0; ``wo`` and ``w2`` on dim 1; the token embedding on dim 1 (LLaMA-1/2; dim 0 when
the shard shapes say so); norms are replicated (shard 0 is taken); ``rope.freqs`` is dropped.

Meta's rotary embedding rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; ours (like
HF) rotates halves (x_i, x_{i+h/2}). Rotary is applied after the q/k projections, so the same
model in our convention has, within each head, the even rows of Meta's wq / wk first and the odd
rows second: q is permuted per head with ``n_heads``, k with ``n_kv_heads``; v never. The tensors
are then named as HF names them and go through the HF mapping, one layer at a time.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_llama.config import ConfigError, ModelConfig
from megatron_llama.checkpoint.hf_source import _check_hf_shapes
from megatron_llama.checkpoint.native_weights import pipeline_layers, torch_load
from megatron_llama.checkpoint.params import check_key_set
from megatron_llama.model.hf_mapping import layer_hf_to_native

_DIM0 = ("wq", "wk", "wv", "w1", "w3", "output")
_DIM1 = ("wo", "w2")
_TO_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection [heads * h, d] from interleaved-pair order to rotate-half order."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class MetaCheckpoint:
    def __init__(self, meta_dir: str, vocab_size: Optional[int] = None):
        self.dir = Path(meta_dir)
        if not (self.dir / "params.json").is_file():
            raise ConfigError(f"{meta_dir} has no params.json: pass Meta's model directory (params.json + "
                              "consolidated.NN.pth)")
        try:
            params = json.loads((self.dir / "params.json").read_text())
            files = sorted(self.dir.glob("consolidated.*.pth"))
            numbers = [int(re.fullmatch(r"consolidated\.(\d+)\.pth", f.name).group(1)) for f in files]
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{meta_dir}: params.json or shard names are not Meta's ({e!s:.60})") from None
        if not files:
            raise ConfigError(f"{meta_dir} has no consolidated.NN.pth shards")
        if numbers != list(range(len(files))):
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            raise ConfigError(f"{meta_dir}: shard consolidated.{missing[0]:02d}.pth is missing: download it again")
        self.shards = [torch_load(f, meta_dir) for f in files]
        emb = self.shards[0]["tok_embeddings.weight"] if "tok_embeddings.weight" in self.shards[0] else None
        if emb is None:
            raise ConfigError(f"{meta_dir}/consolidated.00.pth has no tok_embeddings.weight: not a Meta LLaMA shard")
        n, dim = len(self.shards), params["dim"]
        self.emb_dim = 1 if (n > 1 and emb.shape[1] * n == dim) else 0
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab < 0:
            vocab = vocab_size or emb.shape[0] * (n if self.emb_dim == 0 else 1)
        try:
            self.config = ModelConfig(name="meta", hidden_size=dim, num_layers=params["n_layers"],
                                      num_attention_heads=params["n_heads"],
                                      num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                                      multiple_of=params.get("multiple_of", 256),
                                      ffn_dim_multiplier=params.get("ffn_dim_multiplier"), vocab_size=vocab,
                                      max_seq_len=params.get("max_seq_len", 4096), norm_eps=params.get("norm_eps", 1e-6),
                                      rope_theta=float(params.get("rope_theta", 10000.0)))
        except KeyError as e:
            raise ConfigError(f"{meta_dir}/params.json lacks {e}: not a LLaMA params.json") from None
        self.dtypes = {t.dtype for s in self.shards for k, t in s.items() if k != "rope.freqs" and torch.is_tensor(t)}
        want = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
            f"layers.{i}.{k}.weight" for i in range(self.config.num_layers) for k in _TO_HF}
        for r, s in enumerate(self.shards):
            check_key_set({k for k in s if k != "rope.freqs"}, want, f"{meta_dir}/consolidated.{r:02d}.pth")

    def _full(self, key: str) -> torch.Tensor:
        parts = [s[key] for s in self.shards]
        short = key.rsplit(".", 2)[-2]
        if key == "tok_embeddings.weight":
            return torch.cat(parts, dim=self.emb_dim)
        if short in _DIM0:
            return torch.cat(parts, dim=0)
        if short in _DIM1:
            return torch.cat(parts, dim=1)
        return parts[0].clone()  # norms: replicated

    def hf_layer(self, layer: str) -> dict[str, torch.Tensor]:
        """One pipeline layer's tensors under HF names, q/k permuted to rotate-half."""
        c = self.config
        if layer == "embedding":
            return {"model.embed_tokens.weight": self._full("tok_embeddings.weight")}
        if layer == "final_norm":
            return {"model.norm.weight": self._full("norm.weight")}
        if layer == "head":
            return {"lm_head.weight": self._full("output.weight")}
        out = {}
        for ours, hf in _TO_HF.items():
            w = self._full(f"{layer}.{ours}.weight")
            if ours == "attention.wq":
                w = interleaved_to_halves(w, c.num_attention_heads)
            elif ours == "attention.wk":
                w = interleaved_to_halves(w, c.num_kv_heads)
            out[f"model.{layer}.{hf}.weight"] = w
        return out

    def layers(self, tp: int, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for layer in pipeline_layers(self.config):
            hf = self.hf_layer(layer)
            _check_hf_shapes(hf, self.config)
            ours = layer_hf_to_native(hf, self.config, layer, tp)
            yield layer, {k: (t.to(dtype) if dtype is not None else t) for k, t in ours.items()}
