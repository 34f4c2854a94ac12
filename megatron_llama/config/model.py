"""ModelConfig: the shape of a LLaMA-family transformer, and its parameter count."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from .errors import ConfigError

HEADS = ("lm", "score")

# Which fields each kind of RoPE scaling needs (required) and may have (optional: their
# defaults are transformers'). A field outside both sets would be silently unused: refused.
ROPE_SCALING_FIELDS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}),
}


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary inverse frequencies are rescaled for a longer context (``rotary.py`` computes them).

    ``linear``: every frequency / ``factor`` (position interpolation). ``llama3`` (Llama 3.1+):
    wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by
    ``factor``, shorter than ``... / high_freq_factor`` are kept, the band between is blended.
    ``yarn``: NTK-by-parts between ``beta_fast`` and ``beta_slow`` rotations, and cos/sin scaled by
    ``attention_factor`` (default ``0.1 ln(factor) + 1``, or from ``mscale`` / ``mscale_all_dim``).
    Field names are those of transformers' ``rope_parameters``; ``None`` = not set.
    """

    type: str
    factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "model.rope_scaling") -> "RopeScaling":
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a mapping such as {{type: llama3, factor: 8, low_freq_factor: 1, "
                              f"high_freq_factor: 4, original_max_position_embeddings: 8192}}, got {d!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown key {where}.{unknown[0]}: valid keys are {', '.join(sorted(names))}")
        kwargs = {}
        for f in fields(cls):
            v = d.get(f.name)
            if v is None or f.name == "type":
                kwargs[f.name] = v
                continue
            want = {"original_max_position_embeddings": int, "truncate": bool}.get(f.name, float)
            if isinstance(v, bool) != (want is bool) or not isinstance(v, (int, float)) or (
                    want is int and float(v) != int(v)):
                raise ConfigError(f"{where}.{f.name}: expected {want.__name__ if want is not float else 'a number'},"
                                  f" got {v!r}")
            kwargs[f.name] = want(v)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        where = "model.rope_scaling"
        if self.type not in ROPE_SCALING_FIELDS:
            raise ConfigError(f"{where}.type={self.type!r} is not supported: choose one of "
                              f"{', '.join(ROPE_SCALING_FIELDS)} (or no rope_scaling)")
        required, optional = ROPE_SCALING_FIELDS[self.type]
        given = {f.name for f in fields(self) if f.name != "type" and getattr(self, f.name) is not None}
        missing = sorted(required - given)
        if missing:
            raise ConfigError(f"{where} ({self.type}) lacks {', '.join(missing)}: {self.type} scaling needs "
                              f"{', '.join(sorted(required))}")
        unused = sorted(given - required - optional)
        if unused:
            raise ConfigError(f"{where}.{unused[0]} is not used by {self.type} scaling: remove it (it would "
                              "be silently ignored)")
        if self.factor <= 0 or (self.original_max_position_embeddings or 1) <= 0:
            raise ConfigError(f"{where}: factor and original_max_position_embeddings must be positive")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"{where}: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                              f"{self.low_freq_factor} and {self.high_freq_factor}")

    def hf_parameters(self) -> dict:
        """transformers' ``rope_parameters`` entries (without ``rope_theta``)."""
        return {"rope_type": self.type, **{f.name: getattr(self, f.name) for f in fields(self)
                                           if f.name != "type" and getattr(self, f.name) is not None}}


@dataclass
class ModelConfig:
    """Shape of a decoder-only LLaMA-family model.

    ``ffn_hidden_size`` is derived as in Meta's reference code when left unset:
    ``multiple_of * ceil(ffn_dim_multiplier * int(8 * hidden / 3) / multiple_of)``.
    ``num_kv_heads`` < ``num_attention_heads`` gives grouped-query attention.
    ``head``: ``lm`` (the vocab-parallel LM head) or ``score`` (a reward model's scalar head,
    ``LlamaForSequenceClassification``'s ``score.weight`` [1, d]); set from ``train.objective``.
    ``rope_scaling`` (a ``RopeScaling`` or its mapping, e.g. from YAML) rescales the rotary
    frequencies; None = plain RoPE with ``rope_theta``.
    """

    name: str = "custom"
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    vocab_size: int = 32000
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    qkv_bias: bool = False
    embedding_layernorm: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    head: str = "lm"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            RopeScaling.from_dict(self.rope_scaling)  # raises: not a mapping
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.ffn_hidden_size is None:
            hidden = int(2 * 4 * self.hidden_size / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.ffn_hidden_size = self.multiple_of * math.ceil(hidden / self.multiple_of)
        self.validate()

    def validate(self) -> None:
        for field in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                      "ffn_hidden_size", "vocab_size", "max_seq_len", "multiple_of"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"model.{field} must be positive, got {getattr(self, field)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}: pick heads that divide it")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}: each KV head must serve "
                f"a whole group of query heads")
        if self.head not in HEADS:
            raise ConfigError(f"model.head={self.head!r}: choose one of {', '.join(HEADS)} (train.objective=reward "
                              "sets score)")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int, multiple: int = 1) -> int:
        """Vocabulary rounded up so every TP rank holds an equal slice.

        The extra rows are never produced by the tokenizer; the LM head's logits for them
        are real but learn to be very negative, exactly as in Megatron-LM.
        """
        step = tp * multiple
        return step * math.ceil(self.vocab_size / step)

    # --- parameter counts, computed without allocating anything ---------------------
    def block_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        kv = self.num_kv_heads * hd
        attn = d * d + 2 * d * kv + d * d
        if self.qkv_bias:
            attn += d + 2 * kv
        mlp = 3 * d * self.ffn_hidden_size
        return attn + mlp + 2 * d  # two RMSNorm weights

    def embedding_params(self, tp: int = 1) -> int:
        n = self.padded_vocab_size(tp) * self.hidden_size
        return n + (2 * self.hidden_size if self.embedding_layernorm else 0)

    def head_params(self, tp: int = 1) -> int:
        if self.head == "score":
            return self.hidden_size
        return 0 if self.tie_embeddings else self.padded_vocab_size(tp) * self.hidden_size

    def num_params(self, tp: int = 1) -> int:
        return (self.embedding_params(tp) + self.num_layers * self.block_params()
                + self.hidden_size + self.head_params(tp))

    def matmul_params(self) -> int:
        """Parameters that take part in matrix products (blocks + LM head), for FLOP counts."""
        head = self.vocab_size * self.hidden_size if self.head == "lm" else self.hidden_size
        return self.num_layers * (self.block_params() - 2 * self.hidden_size) + head
