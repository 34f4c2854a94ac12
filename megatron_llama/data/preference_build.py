"""``build_preference_dataset``: a DataConfig of a pair objective -> validated preference pairs.

Input, checked before anything heavy runs (as for SFT, ``sft_build.py``):

* ``sources``: datasets written by ``mllama-preprocess --preference``, concatenated (weights are
  refused, not ignored); ``data.tokenizer`` is required;
* ``corpus``: raw preference JSONL (the shipped ``data/preferences.jsonl``), preprocessed into
  ``data.cache_dir`` on first use (rank 0 first) under a name made of its hash, the template and
  the tokenizer checksum; without ``data.tokenizer`` a tokenizer is trained on the rendered pairs.

Every source's manifest must name the run's chat template and tokenizer (checksum): a set made
with another one is refused in one line. Held-out pairs: ``data.valid_fraction`` of the pairs (by a
hash of the global pair index, data/heldout.py: never trained on), or ``data.valid_sources``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config.errors import ConfigError
from ..config.run import DataConfig
from .chat_template import TemplateError, chat_template
from .heldout import heldout_mask
from .build import _file_hash
from .indexed import inspect_indexed
from .masked_sources import check_made_with, concatenated_source_paths
from .preference_dataset import PreferenceDataset
from .preference_preprocess import margin_path, preprocess_preference, read_manifest
from .masked_tokens import mask_prefix


def trained_tokenizer_prefix(data: DataConfig, model_vocab_size: int) -> Path:
    """Where a preference run with a ``data.corpus`` and no ``data.tokenizer`` keeps its tokenizer."""
    vocab = data.vocab_size or model_vocab_size
    return Path(data.cache_dir) / f"tokenizer-pref-{_file_hash(data.corpus)}-{data.chat_template}-v{vocab}"


def _train_tokenizer(corpus: str, prefix: Path, vocab: int, template) -> str:
    """A tokenizer trained on both sides of every pair, rendered as the model sees them."""
    from .jsonl import iter_lines
    from .preference_records import parse_pair
    from .sft_records import template_text
    from .tokenizer import train_tokenizer
    text = prefix.parent / f".{prefix.name}-{os.getpid()}.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(text, "w", encoding="utf-8") as f:
            for line in iter_lines(corpus):
                pair, _ = parse_pair(line)
                if pair is None:
                    continue
                for answer in (pair.chosen, pair.rejected):
                    messages = pair.context + [{"role": "assistant", "content": answer}]
                    try:
                        template.check(messages)
                    except TemplateError:
                        continue  # a bad record: preprocessing reports it
                    f.write(template_text(messages, template) + "\n")
        return train_tokenizer([str(text)], str(prefix), vocab)
    finally:
        text.unlink(missing_ok=True)


def _prepare_corpus(data: DataConfig, model_vocab_size: int) -> tuple[str, str]:
    template = chat_template(data.chat_template)
    tokenizer = data.tokenizer
    if tokenizer is None:
        prefix = trained_tokenizer_prefix(data, model_vocab_size)
        tokenizer = f"{prefix}.model"
        if not Path(tokenizer).is_file():
            _train_tokenizer(data.corpus, prefix, data.vocab_size or model_vocab_size, template)
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer)
    out = Path(data.cache_dir) / f"pref-{_file_hash(data.corpus)}-{template.name}-tok{tok.checksum[:12]}"
    if not Path(f"{out}.idx").is_file():
        print(preprocess_preference([data.corpus], str(out), tokenizer, template=template.name,
                                    progress=False).describe())
    return tokenizer, str(out)


def _pair_source_paths(sources, key: str) -> list[str]:
    return concatenated_source_paths(sources, key, "for preference pairs (sources are concatenated, each pair "
                                     "seen once per epoch): drop it")


def check_preference_source(prefix: str, where: str, template_name: str, tok) -> np.ndarray:
    """Refuse a source made with another template or tokenizer, or whose files disagree; its margins."""
    from .build import _check_ids
    manifest = read_manifest(prefix, where)
    check_made_with(manifest, prefix, where, template_name, tok, "preprocess again or set data.chat_template")
    info = inspect_indexed(prefix, where)
    mask = inspect_indexed(mask_prefix(prefix), f"{where} (loss mask)")
    margins_file = margin_path(prefix)
    margins = np.load(margins_file) if margins_file.is_file() else None
    pairs = manifest.get("pairs")
    if (info.num_sequences != 2 * pairs or mask.num_sequences != info.num_sequences
            or mask.num_tokens != info.num_tokens or margins is None or len(margins) != pairs):
        raise ConfigError(f"{where}: the files of {prefix} do not match its manifest ({pairs} pairs): "
                          "preprocess again (copy .bin/.idx, .lossmask.*, .margin.npy and .pref.json together)")
    _check_ids(info, tok, where)
    return margins


def build_preference_dataset(data: DataConfig, seed: int, model_vocab_size: int,
                             rank_zero_first: Optional[Callable] = None,
                             split: str = "train") -> Optional[PreferenceDataset]:
    """Validated pairs of ``split`` ("train" or "valid"; None when there is no held-out split)."""
    from .build import _load_tokenizer, check_corpus_or_sources
    run = rank_zero_first or (lambda fn: fn())
    template = chat_template(data.chat_template)
    if split == "valid" and not (data.valid_fraction or data.valid_sources):
        return None
    check_corpus_or_sources(data, model_vocab_size, "raw preference JSONL", "`mllama-preprocess --preference` "
                            "output", "a preference JSONL file (data/preferences.jsonl ships with the repository)")
    if data.corpus is not None:
        out: list = []
        run(lambda: out.append(_prepare_corpus(data, model_vocab_size)))
        tokenizer, paths, name = out[-1][0], [out[-1][1]], f"preference corpus {data.corpus}"
        key = "data.corpus"
    elif data.sources:
        if data.tokenizer is None:
            raise ConfigError("data.sources needs data.tokenizer: the tokenizer.model the preference data was "
                              "preprocessed with")
        tokenizer, paths, name, key = data.tokenizer, _pair_source_paths(data.sources, "data.sources"), \
            "preference sources", "data.sources"
    else:
        raise ConfigError("no training data: a preference run needs data.corpus (raw preference JSONL, e.g. "
                          "data/preferences.jsonl) or data.sources (mllama-preprocess --preference output)")
    selected = None
    if split == "valid" and data.valid_sources:
        paths, key, name = _pair_source_paths(data.valid_sources, "data.valid_sources"), "data.valid_sources", \
            "held-out preference sources"
    tok = _load_tokenizer(tokenizer, model_vocab_size)
    margins = [check_preference_source(p, f"{key}[{i}]" if len(paths) > 1 or key != "data.corpus" else key,
                                       template.name, tok) for i, p in enumerate(paths)]
    if data.valid_fraction and not (split == "valid" and data.valid_sources):
        held = heldout_mask(sum(len(m) for m in margins), data.valid_fraction)
        selected = held if split == "valid" else ~held
    if split == "valid":
        name = f"{name} (held out)" if not data.valid_sources else name
    ds = PreferenceDataset(paths, [mask_prefix(p) for p in paths], margins, data.seq_len,
                           data.preference_overlong, tok.eos_id, name, selected)
    if len(ds) == 0:
        raise ConfigError(f"{name}: no pair fits data.seq_len={data.seq_len} with data.preference_overlong="
                          f"{data.preference_overlong}: raise seq_len or use preference_overlong=truncate")
    return ds
