"""``build_sft_dataset``: a DataConfig with ``sft: true`` -> packed, document-masked SFT rows.

Two kinds of input, as for pretraining (``build.py``), checked before anything heavy runs:

* ``sources``: datasets written by ``mllama-preprocess --sft`` (tokens + ``.lossmask`` + ``.sft.json``),
  each seen once per epoch (SFT mixes by concatenation; weights are refused, not ignored);
* ``corpus``: raw SFT JSONL (the quickstart, ``data/instructions.jsonl``): a tokenizer is trained on
  the rendered conversations unless ``data.tokenizer`` is given, and the records are preprocessed
  into ``data.cache_dir`` on first use (rank 0 first), both named by a hash of their inputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from ..config.errors import ConfigError
from ..config.run import DataConfig
from .chat_template import TemplateError, chat_template
from .build import _file_hash
from .indexed import inspect_indexed
from .masked_sources import check_made_with, concatenated_source_paths
from .sft_dataset import PackedSFTDataset
from .masked_tokens import mask_prefix
from .sft_preprocess import preprocess_sft, read_manifest
from .sft_records import parse_record, template_text


def _train_chat_tokenizer(corpus: str, prefix: Path, vocab: int, template) -> str:
    """A tokenizer trained on the conversations as the model will see them (markup included):
    SentencePiece (``prefix.model``) for llama2, a byte-level BPE with Llama 3's special tokens
    (``prefix/tokenizer.json``) for llama3 (``template.trained_kind``)."""
    from .jsonl import iter_lines
    from .tokenizer_hf import train_bpe_bytelevel
    from .tokenizer_sp import train_tokenizer
    text = prefix.parent / f".{prefix.name}-{os.getpid()}.txt"  # .txt: read as plain lines
    text.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(text, "w", encoding="utf-8") as f:
            for line in iter_lines(corpus):
                messages, _ = parse_record(line)
                try:
                    template.check(messages or [])
                except TemplateError:
                    continue  # a bad record: preprocessing reports it
                f.write(template_text(messages, template) + "\n")
        if template.trained_kind == "bpe-bytelevel":
            return train_bpe_bytelevel([str(text)], str(prefix), vocab)
        return train_tokenizer([str(text)], str(prefix), vocab)
    finally:
        text.unlink(missing_ok=True)


def trained_tokenizer_prefix(data: DataConfig, model_vocab_size: int) -> Path:
    """Where a run with an SFT ``data.corpus`` and no ``data.tokenizer`` keeps the tokenizer it
    trained (``<prefix>.model``); exporters find it here too."""
    vocab = data.vocab_size or model_vocab_size
    return Path(data.cache_dir) / f"tokenizer-sft-{_file_hash(data.corpus)}-{data.chat_template}-v{vocab}"


def trained_tokenizer_path(data: DataConfig, model_vocab_size: int) -> Path:
    """The file ``_train_chat_tokenizer`` writes for this run's template."""
    prefix = trained_tokenizer_prefix(data, model_vocab_size)
    if chat_template(data.chat_template).trained_kind == "bpe-bytelevel":
        return prefix / "tokenizer.json"
    return Path(f"{prefix}.model")


def _prepare_corpus(data: DataConfig, model_vocab_size: int) -> tuple[str, str]:
    corpus, cache = data.corpus, Path(data.cache_dir)
    key = _file_hash(corpus)
    template = chat_template(data.chat_template)
    tokenizer = data.tokenizer
    if tokenizer is None:
        prefix = trained_tokenizer_prefix(data, model_vocab_size)
        tokenizer = str(trained_tokenizer_path(data, model_vocab_size))
        if not Path(tokenizer).is_file():
            _train_chat_tokenizer(corpus, prefix, data.vocab_size or model_vocab_size, template)
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer)
    out = cache / f"sft-{key}-{template.name}-tok{tok.checksum[:12]}"
    if not Path(f"{out}.idx").is_file():
        print(preprocess_sft([corpus], str(out), tokenizer, template=template.name, progress=False).describe())
    return tokenizer, str(out)


def build_sft_dataset(data: DataConfig, seed: int, model_vocab_size: int,
                      rank_zero_first: Optional[Callable] = None) -> PackedSFTDataset:
    """Validated, packed SFT rows for ``data`` (``data.sft`` is true); ConfigError for bad input."""
    from .build import _check_ids, _load_tokenizer, check_corpus_or_sources  # shared with pretraining data
    run = rank_zero_first or (lambda fn: fn())
    seq_len = data.seq_len
    template = chat_template(data.chat_template)
    if data.synthetic:
        raise ConfigError("data.synthetic=true with data.sft=true: SFT needs real conversations; "
                          "set data.corpus: data/instructions.jsonl (shipped) instead")
    check_corpus_or_sources(data, model_vocab_size, "raw SFT JSONL", "`mllama-preprocess --sft` output",
                            "an SFT JSONL file (data/instructions.jsonl ships with the repository)")
    if data.corpus is not None:
        out: list = []
        run(lambda: out.append(_prepare_corpus(data, model_vocab_size)))
        tokenizer, paths, name = out[-1][0], [out[-1][1]], f"SFT corpus {data.corpus}"
    elif data.sources:
        if data.tokenizer is None:
            raise ConfigError("data.sources needs data.tokenizer: the tokenizer.model the SFT data was "
                              "preprocessed with")
        tokenizer, paths, name = data.tokenizer, concatenated_source_paths(
            data.sources, "data.sources", "with data.sft=true (SFT sources are concatenated, each seen once per "
            "epoch): drop it, or repeat the source to upweight it"), "SFT sources"
    else:
        raise ConfigError("no training data: with data.sft=true set data.corpus (raw SFT JSONL, e.g. "
                          "data/instructions.jsonl) or data.sources (mllama-preprocess --sft output)")

    tok = _load_tokenizer(tokenizer, model_vocab_size)
    for i, prefix in enumerate(paths):
        where = f"data.sources[{i}]" if name == "SFT sources" else f"data.corpus={data.corpus}"
        manifest = read_manifest(prefix, where)
        check_made_with(manifest, prefix, where, template.name, tok,
                        "preprocess again or set data.chat_template to match")
        info = inspect_indexed(prefix, where)
        mask = inspect_indexed(mask_prefix(prefix), f"{where} (loss mask)")
        if mask.num_sequences != info.num_sequences or mask.num_tokens != info.num_tokens:
            raise ConfigError(f"{where}: {prefix}.lossmask does not match {prefix} ({mask.num_sequences} vs "
                              f"{info.num_sequences} samples): preprocess again (copy all the files together)")
        _check_ids(info, tok, where)
    ds = PackedSFTDataset(paths, [mask_prefix(p) for p in paths], seq_len, seed, data.sft_overlong,
                          tok.eos_id, tok, name)
    if len(ds) == 0:
        raise ConfigError(f"{name}: no sample fits data.seq_len={seq_len} with data.sft_overlong="
                          f"{data.sft_overlong}: raise seq_len or use sft_overlong=truncate")
    return ds
