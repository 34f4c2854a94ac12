"""Meta's original LLaMA / Llama 2 / Llama 3 checkpoints: ``params.json`` + ``consolidated.NN.pth`` (one per MP rank).

Llama 3.x ``params.json`` adds ``n_kv_heads``, ``rope_theta`` (5e5), ``ffn_dim_multiplier`` /
``multiple_of`` and ``use_scaled_rope``: Meta's reference code then rescales the rotary frequencies
with low_freq_factor 1, high_freq_factor 4 and an original context of 8192, by a factor that the
file does not always say (8 for Llama 3.1 / 3.3, 32 for Llama 3.2 1B/3B): ``rope_scaling_factor``
when present, else ``--rope-scaling-factor``, else refused. Without ``output.weight`` the head is
tied to the embedding (Llama 3.2 1B/3B). Every params.json key is read or refused, and every shard's
tensor shapes are checked against params.json before anything is written.

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


# Meta's Llama 3.1 constants (its apply_scaling): only the factor varies between releases.
LLAMA3_ROPE = dict(type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
           "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "max_batch_size"}


def meta_rope(params: dict, where: str, factor: Optional[float]) -> Optional[dict]:
    """``model.rope_scaling`` of a params.json (None without ``use_scaled_rope``)."""
    if not params.get("use_scaled_rope"):
        if params.get("rope_scaling_factor") is not None:
            raise ConfigError(f"{where}: rope_scaling_factor without use_scaled_rope: set use_scaled_rope true or "
                              "remove it")
        return None
    in_file = params.get("rope_scaling_factor")
    if in_file is not None and factor is not None and float(in_file) != factor:
        raise ConfigError(f"{where} says rope_scaling_factor {in_file} but --rope-scaling-factor is {factor}: "
                          "drop the flag")
    factor = in_file if in_file is not None else factor
    if factor is None:
        raise ConfigError(f"{where} has use_scaled_rope but no rope_scaling_factor: pass --rope-scaling-factor 8 "
                          "(Llama 3.1 / 3.3) or 32 (Llama 3.2 1B/3B)")
    return dict(LLAMA3_ROPE, factor=float(factor))


class MetaCheckpoint:
    def __init__(self, meta_dir: str, vocab_size: Optional[int] = None, rope_scaling_factor: Optional[float] = None):
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
        where = f"{meta_dir}/params.json"
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            raise ConfigError(f"{where}: key {unknown[0]}={params[unknown[0]]!r} is not understood by this converter "
                              "(it may change the model's math)")
        n, dim = len(self.shards), params.get("dim")
        self.emb_dim = 1 if (n > 1 and emb.shape[1] * n == dim) else 0
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab < 0:
            vocab = vocab_size or emb.shape[0] * (n if self.emb_dim == 0 else 1)
        tied = "output.weight" not in self.shards[0]  # Llama 3.2 1B/3B
        scaled = meta_rope(params, where, rope_scaling_factor)
        try:
            self.config = ModelConfig(name="meta", hidden_size=dim, num_layers=params["n_layers"],
                                      num_attention_heads=params["n_heads"],
                                      num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                                      multiple_of=params.get("multiple_of", 256),
                                      ffn_dim_multiplier=params.get("ffn_dim_multiplier"), vocab_size=vocab,
                                      max_seq_len=params.get("max_seq_len", 131072 if scaled else 4096),
                                      norm_eps=params.get("norm_eps", 1e-6),
                                      rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaled,
                                      tie_embeddings=tied)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where} lacks {e}: not a LLaMA params.json") from None
        self.dtypes = {t.dtype for s in self.shards for k, t in s.items() if k != "rope.freqs" and torch.is_tensor(t)}
        want = {"tok_embeddings.weight", "norm.weight"} | ({"output.weight"} if not tied else set()) | {
            f"layers.{i}.{k}.weight" for i in range(self.config.num_layers) for k in _TO_HF}
        for r, s in enumerate(self.shards):
            check_key_set({k for k in s if k != "rope.freqs"}, want, f"{meta_dir}/consolidated.{r:02d}.pth")
            self._check_shapes(s, f"{meta_dir}/consolidated.{r:02d}.pth")

    def _check_shapes(self, shard: dict, what: str) -> None:
        """Each tensor of one shard against the shape params.json implies (split over the shards)."""
        c, n = self.config, len(self.shards)
        d, h, f = c.hidden_size, c.head_dim, c.ffn_hidden_size
        full = {"tok_embeddings": (c.vocab_size, d), "output": (c.vocab_size, d), "norm": (d,),
                "wq": (c.num_attention_heads * h, d), "wk": (c.num_kv_heads * h, d), "wv": (c.num_kv_heads * h, d),
                "wo": (d, c.num_attention_heads * h), "w1": (f, d), "w3": (f, d), "w2": (d, f),
                "attention_norm": (d,), "ffn_norm": (d,)}
        for key, t in shard.items():
            if key == "rope.freqs":
                continue
            short = key.rsplit(".", 2)[-2]
            want = list(full[short])
            split = self.emb_dim if short == "tok_embeddings" else 0 if short in _DIM0 else 1 if short in _DIM1 else None
            if split is not None and n > 1:
                want[split] = want[split] // n if want[split] % n == 0 else -1
            if tuple(t.shape) != tuple(want):
                raise ConfigError(
                    f"{what}: {key} has shape {tuple(t.shape)} but params.json (dim {d}, n_heads "
                    f"{c.num_attention_heads}, n_kv_heads {c.num_kv_heads}, ffn {f}, vocab {c.vocab_size}, {n} "
                    f"shards) implies {tuple(want)}: params.json disagrees with the tensors")

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
            return {} if c.tie_embeddings else {"lm_head.weight": self._full("output.weight")}
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
