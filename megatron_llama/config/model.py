"""ModelConfig: the shape of a LLaMA-family transformer, and its parameter count."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

HEADS = ("lm", "score")


@dataclass
class ModelConfig:
    """Shape of a decoder-only LLaMA-family model.

    ``ffn_hidden_size`` is derived as in Meta's reference code when left unset:
    ``multiple_of * ceil(ffn_dim_multiplier * int(8 * hidden / 3) / multiple_of)``.
    ``num_kv_heads`` < ``num_attention_heads`` gives grouped-query attention.
    ``head``: ``lm`` (the vocab-parallel LM head) or ``score`` (a reward model's scalar head,
    ``LlamaForSequenceClassification``'s ``score.weight`` [1, d]); set from ``train.objective``.
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
    qkv_bias: bool = False
    embedding_layernorm: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    head: str = "lm"

    def __post_init__(self) -> None:
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
