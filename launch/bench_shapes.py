"""Model shapes ``mllama-bench`` knows: the presets, plus benchmark-only shapes defined here.

``llama3-8b-8l``: the Llama 3 8B block (hidden 4096, 32 heads, 8 KV heads, FFN 14336, vocab
128256, RoPE theta 5e5; Grattafiori et al. 2024, table 3) cut to 8 layers, for the 8k-sequence
comparison. A benchmark shape, not a training preset.
"""
from __future__ import annotations

from megatron_llama.config import ModelConfig, preset

BENCH_SHAPES: dict[str, dict] = {
    "llama3-8b-8l": dict(hidden_size=4096, num_layers=8, num_attention_heads=32, num_kv_heads=8,
                         ffn_hidden_size=14336, vocab_size=128256, rope_theta=500000.0),
}


def bench_model(name: str, seq_len: int) -> ModelConfig:
    """The ModelConfig of shape ``name`` (a bench shape or a preset), long enough for ``seq_len``."""
    if name in BENCH_SHAPES:
        return ModelConfig(**BENCH_SHAPES[name], max_seq_len=max(seq_len, 8192))
    return preset(name, max_seq_len=max(seq_len, 2048))
