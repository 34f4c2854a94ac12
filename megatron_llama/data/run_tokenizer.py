"""Which ``tokenizer.model`` a run used, from its resolved config alone (exporters, mllama-rs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config.run import RunConfig


def run_tokenizer(config: RunConfig) -> Optional[str]:
    """``data.tokenizer``, or the one trained into ``data.cache_dir`` from ``data.corpus`` (named by the
    corpus's hash: data/build.py, sft_build.py, preference_build.py); None if there is none."""
    data = config.data
    if data.tokenizer:
        return data.tokenizer
    if not (data.corpus and Path(data.corpus).is_file()):
        return None
    if config.preference:
        from .preference_build import trained_tokenizer_prefix
        path = Path(f"{trained_tokenizer_prefix(data, config.model.vocab_size)}.model")
    elif data.sft:
        from .sft_build import trained_tokenizer_prefix
        path = Path(f"{trained_tokenizer_prefix(data, config.model.vocab_size)}.model")
    else:
        from .build import _file_hash
        vocab = data.vocab_size or config.model.vocab_size
        path = Path(data.cache_dir) / f"tokenizer-{_file_hash(data.corpus)}-{data.text_key}-v{vocab}.model"
    return str(path) if path.is_file() else None
