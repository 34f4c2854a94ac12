"""Published LLaMA-family shapes (parameter counts match the papers and model cards) and tiny test shapes."""
from __future__ import annotations

from .errors import ConfigError
from .model import ModelConfig

# Llama 3: 128256-token byte-level BPE, GQA with 8 KV heads, theta 5e5, 8k context (Grattafiori
# et al. 2024, table 3); the FFN sizes follow from Meta's params.json (multiple_of,
# ffn_dim_multiplier). 3.1+ stretch the context to 128k with llama3 RoPE scaling; 3.2 1B/3B tie
# the embeddings and scale by 32 instead of 8.
_LLAMA3 = dict(vocab_size=128256, num_kv_heads=8, rope_theta=500000.0, max_seq_len=8192)


def _llama31(factor: float) -> dict:
    return dict(_LLAMA3, max_seq_len=131072, rope_scaling=dict(
        type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))


_L3_8B = dict(hidden_size=4096, num_layers=32, num_attention_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3)
_L3_70B = dict(hidden_size=8192, num_layers=80, num_attention_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3)

_PRESETS: dict[str, dict] = {
    # LLaMA (Touvron et al. 2023a), table 2
    "llama-7b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32),
    "llama-13b": dict(hidden_size=5120, num_layers=40, num_attention_heads=40),
    "llama-33b": dict(hidden_size=6656, num_layers=60, num_attention_heads=52),
    "llama-65b": dict(hidden_size=8192, num_layers=80, num_attention_heads=64),
    # Llama 2 (Touvron et al. 2023b): 4k context, GQA with 8 KV heads for 70B
    "llama2-7b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, max_seq_len=4096),
    "llama2-13b": dict(hidden_size=5120, num_layers=40, num_attention_heads=40, max_seq_len=4096),
    "llama2-70b": dict(hidden_size=8192, num_layers=80, num_attention_heads=64, num_kv_heads=8,
                       ffn_dim_multiplier=1.3, multiple_of=4096, max_seq_len=4096),
    "llama3-8b": dict(_L3_8B, **_LLAMA3),
    "llama3-70b": dict(_L3_70B, **_LLAMA3),
    "llama3.1-8b": dict(_L3_8B, **_llama31(8.0)),
    "llama3.1-70b": dict(_L3_70B, **_llama31(8.0)),
    "llama3.1-405b": dict(hidden_size=16384, num_layers=126, num_attention_heads=128, multiple_of=4096,
                          ffn_dim_multiplier=1.2, **_llama31(8.0)),
    "llama3.2-1b": dict(hidden_size=2048, num_layers=16, num_attention_heads=32, multiple_of=256,
                        ffn_dim_multiplier=1.5, tie_embeddings=True, **_llama31(32.0)),
    "llama3.2-3b": dict(hidden_size=3072, num_layers=28, num_attention_heads=24, multiple_of=256,
                        ffn_dim_multiplier=1.0, tie_embeddings=True, **_llama31(32.0)),
    "llama3.3-70b": dict(_L3_70B, **_llama31(8.0)),
    # The 7B block shape cut to 8 layers: the single-GPU benchmark shape.
    "llama-7b-8l": dict(hidden_size=4096, num_layers=8, num_attention_heads=32),
    # Tiny shapes for CPU tests and the quickstart.
    "tiny": dict(hidden_size=64, num_layers=4, num_attention_heads=4, multiple_of=16,
                 vocab_size=512, max_seq_len=256),
    "tiny-gqa": dict(hidden_size=64, num_layers=4, num_attention_heads=8, num_kv_heads=4,
                     multiple_of=16, vocab_size=512, max_seq_len=256),
    "tiny-1b-gpu": dict(hidden_size=2048, num_layers=16, num_attention_heads=16,
                        num_kv_heads=8, vocab_size=32000, max_seq_len=2048),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig for a named preset, with optional field overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(preset_names())}")
    return ModelConfig(name=name, **{**_PRESETS[name], **overrides})
