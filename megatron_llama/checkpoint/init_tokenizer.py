"""The tokenizer of a run that starts from other weights (``train.init_from``).

Weights mean something only with the tokenizer they were trained with: row ``i`` of the
embedding is token ``i`` of *that* tokenizer. So, for a run with ``train.init_from``:

* no ``data.tokenizer``: the source's tokenizer is carried into the run (``data.tokenizer`` is set
  to it) instead of a new one being trained from the run's corpus. The source's tokenizer is an HF
  directory's ``tokenizer.json`` / ``tokenizer.model``, or a native checkpoint's ``data.tokenizer``,
  or the one its run trained into its ``data.cache_dir``;
* ``data.tokenizer`` with the source's ids (same checksum, or the same token at every id): as is;
* an *extension* of the source's tokenizer (every source id is the same token, new ids appended):
  the vocabulary grows to the run's ``model.vocab_size``; ``init_from.py`` copies the source's rows
  and starts the new ones per ``train.init_new_rows``;
* any other tokenizer, or a tokenizer with a source that records none: refused in one line.

Synthetic data (or a run without ``data.corpus`` / ``data.sources``) has no tokenizer: nothing is
carried or checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_llama.config import ConfigError, ModelConfig, RunConfig
from megatron_llama.data.run_tokenizer import run_tokenizer


@dataclass
class TokenizerPlan:
    source_vocab: int      # rows of the source's embedding (its model.vocab_size, unpadded)
    line: Optional[str]    # what the run log says about it (None: nothing to say)


def _native_config(spec: str) -> RunConfig:
    """The resolved config of a native checkpoint or of a resharded store (``mllama-convert reshard``)."""
    from .resharded import resharded_step_dir
    store = resharded_step_dir(spec)
    if store is not None:
        import json

        from megatron_llama.config import config_from_dict

        from .directory import META
        return config_from_dict(json.loads((store / META).read_text())["config"])
    from .native_weights import open_native
    return open_native(spec).config


def source_model(spec: str) -> ModelConfig:
    if spec.startswith("hf:"):
        from .hf_source import hf_model_config
        return hf_model_config(spec[3:])
    return _native_config(spec).model


def source_tokenizer(spec: str) -> Optional[str]:
    """The tokenizer file the weights at ``spec`` were trained with, None if the source records none."""
    if spec.startswith("hf:"):
        d = Path(spec[3:])
        return str(d) if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file() else None
    return run_tokenizer(_native_config(spec))


def extends(old, new) -> Optional[str]:
    """None if tokenizer ``new`` keeps every id of ``old`` (same token; ids may be appended), else the first
    difference, in words."""
    if new.vocab_size < old.vocab_size:
        return f"it has {new.vocab_size} ids, fewer than the source's {old.vocab_size}"
    for i in range(old.vocab_size):
        a, b = old.id_to_token(i), new.id_to_token(i)
        if a != b:
            return f"id {i} is {b!r} in it but {a!r} in the source's"
    return None


def plan_init_tokenizer(cfg: RunConfig) -> TokenizerPlan:
    """Carry or check the run's tokenizer against ``train.init_from``'s (may set ``cfg.data.tokenizer``);
    ConfigError (one line) when they do not go together."""
    spec = cfg.train.init_from
    where = f"train.init_from={spec}"
    src = source_model(spec)
    if cfg.data.synthetic or not (cfg.data.corpus or cfg.data.sources):
        return TokenizerPlan(src.vocab_size, None)  # no text to tokenize, no token files to read
    from megatron_llama.data.tokenizer import Tokenizer
    src_path = source_tokenizer(spec)
    if cfg.data.tokenizer is None:
        if src_path is None:
            raise ConfigError(f"{where} records no tokenizer (or the one its run trained is gone): set "
                              "data.tokenizer to the tokenizer its weights were trained with")
        cfg.data.tokenizer = src_path
        return TokenizerPlan(src.vocab_size, f"tokenizer: the source's, {Tokenizer.load(src_path).describe()}")
    if src_path is None:
        raise ConfigError(f"{where} records no tokenizer, so data.tokenizer={cfg.data.tokenizer} cannot be checked "
                          "against the one its weights were trained with: convert it with --tokenizer, or use an "
                          "HF directory that has its tokenizer")
    old, new = Tokenizer.load(src_path), Tokenizer.load(cfg.data.tokenizer)
    if old.checksum == new.checksum:
        return TokenizerPlan(src.vocab_size, None)
    why = extends(old, new)
    if why is not None:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of {where} ({src_path}) nor an "
                          f"extension of it ({why}): drop data.tokenizer to carry the source's, or extend it with "
                          "`mllama-tokenizer extend` (existing ids unchanged)")
    if new.vocab_size == old.vocab_size:
        return TokenizerPlan(src.vocab_size, None)  # same ids, e.g. other special-token names or metadata
    if cfg.model.vocab_size < new.vocab_size:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} has {new.vocab_size} ids but model.vocab_size is "
                          f"{cfg.model.vocab_size}: set model.vocab_size={new.vocab_size} to grow the source's "
                          f"{src.vocab_size} rows")
    if cfg.model.vocab_size <= src.vocab_size:
        return TokenizerPlan(src.vocab_size, None)  # the new ids fit rows the source already has
    return TokenizerPlan(src.vocab_size, (
        f"tokenizer: {new.describe()} extends the source's ({old.vocab_size} ids): vocabulary "
        f"{src.vocab_size} -> {cfg.model.vocab_size} rows, new rows start at {cfg.train.init_new_rows}"
        + (" of the source's rows" if cfg.train.init_new_rows == "mean" else "")))
