"""A Hugging Face model directory as a weight source, streamed one tensor at a time.

Reads ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` without
sliding window) into a ``ModelConfig``: RoPE from ``rope_parameters`` (transformers 5) or ``rope_scaling``
(older files); any field our model cannot represent (Llama's ``attention_bias``: q, k, v *and* o biases;
``mlp_bias``; ``head_dim`` != hidden / heads; sliding windows; partial rotary; an unknown rope type or
field) is refused in one line, never dropped; and tensors from ``model.safetensors``, sharded
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
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# config.json fields read below, or that change nothing our model computes (bookkeeping, generation, init,
# or ignored by transformers 5 itself: pretraining_tp). Any other field is refused: it might change the math.
_KNOWN = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
          "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "pretraining_tp", "_name_or_path",
          "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
          "max_window_layers", "use_sliding_window", "sliding_window", "layer_types", "attention_dropout",
          "head_dim", "attention_bias", "mlp_bias", "hidden_act", "rope_scaling", "rope_parameters", "rope_theta",
          "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size", "max_position_embeddings", "rms_norm_eps", "partial_rotary_factor", "id2label", "label2id",
          "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "tokenizer_class", "prefix",
          "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "add_cross_attention",
          "tie_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "architectures", "generation_config",
          "keys_to_ignore_at_inference", "output_scores", "return_dict_in_generate", "num_labels", "use_mrope"}


def hf_rope(c: dict, where: str) -> tuple[float, Optional[dict]]:
    """(rope theta, our ``model.rope_scaling`` mapping or None) from ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (older files); both present must agree. Every key is read; unknown ones are refused."""
    found = {k: c[k] for k in ("rope_parameters", "rope_scaling") if c.get(k) is not None}
    for k, v in found.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: {k} must be a mapping, got {v!r}")
    norm = {k: _rope_type(v) for k, v in found.items()}
    if len(found) == 2:
        body = [{k: v for k, v in d.items() if k not in ("rope_theta", "type", "rope_type")} for d in found.values()]
        if len(set(norm.values())) > 1 or body[0] != body[1]:
            raise ConfigError(f"{where}: rope_parameters {found['rope_parameters']} and rope_scaling "
                              f"{found['rope_scaling']} disagree: keep one of them")
    rope = dict(next(iter(found.values()), {}))
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = c.get("rope_theta", 10000.0)
    elif c.get("rope_theta") not in (None, theta):
        raise ConfigError(f"{where}: rope_theta {c['rope_theta']} and rope_parameters.rope_theta {theta} disagree")
    partial = rope.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor={partial} (RoPE on part of each head) is not supported: "
                          "our model rotates whole heads")
    kind = _rope_type(rope)
    rope = {k: v for k, v in rope.items() if k not in ("type", "rope_type")}
    if kind == "default":
        if rope:
            raise ConfigError(f"{where}: rope type default with {sorted(rope)} is not understood: remove them")
        return float(theta), None
    if kind == "yarn" and "truncate" in rope and rope["truncate"] is None:
        rope["truncate"] = False  # transformers reads a null truncate as false
    from megatron_llama.config.model import RopeScaling
    try:
        RopeScaling.from_dict({"type": kind, **rope})
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).replace('model.rope_scaling', 'rope scaling')}") from None
    return float(theta), {"type": kind, **rope}


def _rope_type(d: dict) -> str:
    return d.get("rope_type", d.get("type", "default"))


def hf_model_config(hf_dir: str | os.PathLike, name: str = "hf") -> ModelConfig:
    """``ModelConfig`` of an HF LLaMA-family ``config.json``; a field our model cannot represent is a ConfigError."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).exists():
        raise ConfigError(f"{hf_dir} does not exist: pass a Hugging Face model directory (save_pretrained output)")
    if not Path(hf_dir).is_dir():
        raise ConfigError(f"{hf_dir} is a file, not a directory: pass the Hugging Face model directory that holds it")
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
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ConfigError(f"{path}: head_dim {c['head_dim']} != hidden_size / num_attention_heads "
                          f"({c['hidden_size'] // heads}) is not supported: our heads are hidden_size / heads wide")
    sliding = c.get("use_sliding_window") if arch.startswith("Qwen2") else c.get("sliding_window")
    if sliding or any(t != "full_attention" for t in c.get("layer_types") or []):
        raise ConfigError(f"{path}: sliding-window attention is not supported: convert a model whose layers all use "
                          "full attention (use_sliding_window false / sliding_window null)")
    if arch.startswith("Qwen2"):
        qkv_bias = True  # Qwen2: bias on q, k, v (not on o)
    elif c.get("attention_bias"):
        raise ConfigError(f"{path}: attention_bias=true puts a bias on q, k, v and o_proj; our model has a q, k, v "
                          "bias only (Qwen2's): not supported")
    else:
        qkv_bias = False
    head = "score" if arch.endswith("ForSequenceClassification") else "lm"
    if head == "score" and (c.get("num_labels") or len(c.get("id2label") or {0: 0})) != 1:
        raise ConfigError(f"{path}: a sequence classifier with {len(c['id2label'])} labels is not a reward model: "
                          "only one label (a scalar score) is supported")
    if c.get("mlp_bias"):
        raise ConfigError(f"{path}: mlp_bias=true is not supported (LLaMA MLPs have no bias)")
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act={c['hidden_act']!r} is not supported: our MLP is SwiGLU (silu)")
    if c.get("attention_dropout"):
        raise ConfigError(f"{path}: attention_dropout={c['attention_dropout']} is not supported (our attention has "
                          "no dropout): set it to 0.0")
    if c.get("use_mrope"):
        raise ConfigError(f"{path}: use_mrope=true (multimodal RoPE) is not supported")
    if c.get("quantization_config"):
        raise ConfigError(f"{path}: quantized weights (quantization_config) are not supported: convert the "
                          "unquantized model")
    unknown = sorted(k for k in c if k not in _KNOWN and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{path}: field {unknown[0]}={c[unknown[0]]!r} is not understood by this converter "
                          "(it may change the model's math): remove it if it does not")
    theta, scaling = hf_rope(c, str(path))
    return ModelConfig(name=name, hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                       num_attention_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
                       ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                       max_seq_len=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias,
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

    def dtypes(self) -> set:
        """The dtypes the tensors are stored in, from the safetensors headers (or the memory-mapped
        ``.bin`` files): nothing is read. Unknown safetensors dtypes come back as their name."""
        out = set()
        for name, f in self.where.items():
            if f.suffix == ".safetensors":
                code = self._handle(f).get_slice(name).get_dtype()
                out.add(_SAFETENSORS_DTYPES.get(code, code))
            else:
                out.add(self._handle(f)[name].dtype)
        return out

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
