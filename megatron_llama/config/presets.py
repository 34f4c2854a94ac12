"""Published LLaMA-family shapes (parameter counts match the papers) and tiny test shapes."""
from __future__ import annotations

from .errors import ConfigError
from .model import ModelConfig

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
