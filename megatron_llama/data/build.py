"""``build_train_dataset``: a DataConfig -> windows of ``seq_len + 1`` tokens, validated up front.

Three kinds of input:

* ``synthetic``: deterministic random tokens from the seed (tests and benchmarks only);
* ``sources``: preprocessed ``.bin``/``.idx`` corpora blended by weight (see blending.py),
  read with ``data.tokenizer``;
* ``corpus``: raw JSONL, for the quickstart: a tokenizer is trained (unless ``data.tokenizer``
  is given) and the corpus preprocessed into ``data.cache_dir`` on first use, both named by
  a hash of their inputs, so later runs reuse them.

Everything a user can get wrong is checked before anything heavy runs, on every rank (cheap,
and identical everywhere, so all ranks fail together instead of some waiting at a barrier).
Heavy work (tokenizer training, preprocessing, index building) runs inside
``rank_zero_first``, so only global rank 0 does it and the others load the cached results.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config.errors import ConfigError
from ..config.run import DataConfig
from .heldout import SYNTHETIC_VALID_SEED, document_tokens, split_documents
from .blending import blend, parse_sources, plan_blend, samples_per_source
from .indexed import IndexInfo, inspect_indexed
from .packing import TokenizerView, packed_source, window, windows_per_epoch
from .tokenizer import Tokenizer, train_tokenizer

DEFAULT_SEQ_LEN = 2048
ID_CHECK_TOKENS = 1 << 20  # token ids checked against the vocabulary at start-up, per source


class SyntheticDataset:
    """Window ``i`` = random ids seeded by ``(seed, i)``: reproducible, nothing to learn."""

    tokenizer = None

    def __init__(self, seq_len: int, vocab_size: int, seed: int, num_samples: int = 1 << 20):
        self.seq_len, self.vocab_size, self.seed, self.num_samples = seq_len, vocab_size, seed, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(i)])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)

    def describe(self) -> str:
        return f"synthetic data: {self.num_samples:,} windows of {self.seq_len}+1 random ids < {self.vocab_size}"


class TrainDataset:
    """Blended, packed windows: ``ds[i]`` is int64 ``[seq_len + 1]``, ``i < length``.

    ``inner`` (a GPTDataset or BlendedDataset) may hold a few more windows than planned (whole
    epochs, blend surplus); exactly ``length`` are served, so an epoch means the planned mix.
    """

    def __init__(self, inner, length: int, seq_len: int, tokenizer: Tokenizer, summary: str):
        self.inner, self.length, self.seq_len = inner, length, seq_len
        self.tokenizer, self._summary = tokenizer, summary

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.length:
            raise IndexError(f"window {i} out of range [0, {self.length})")
        return window(self.inner[int(i)])

    def describe(self) -> str:
        return self._summary


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _check_ids(info: IndexInfo, tok: Tokenizer, where: str) -> None:
    """The first tokens of the corpus must be ids of this tokenizer (catches a wrong tokenizer)."""
    ids = np.memmap(f"{info.prefix}.bin", dtype=info.dtype, mode="r",
                    shape=(min(info.num_tokens, ID_CHECK_TOKENS),))
    top = int(ids.max()) if len(ids) else 0
    if top >= tok.vocab_size:
        raise ConfigError(f"{where}: {info.prefix}.bin contains token id {top} but tokenizer "
                          f"{tok.path} has only {tok.vocab_size} ids: the corpus was preprocessed "
                          "with another tokenizer; set data.tokenizer to that one")


def _check_size(info: IndexInfo, seq_len: int, where: str) -> None:
    if info.num_tokens == 0:
        raise ConfigError(f"{where}: {info.prefix} is an empty corpus (0 tokens): preprocess a "
                          "corpus with documents in it")
    if info.num_tokens < seq_len + 1:
        raise ConfigError(f"{where}: {info.prefix} has {info.num_tokens} tokens, fewer than one "
                          f"sequence (seq_len+1 = {seq_len + 1}): add data or lower data.seq_len")


def _load_tokenizer(path: Optional[str], model_vocab_size: int) -> Tokenizer:
    tok = Tokenizer.load(path)
    tok.check_fits(model_vocab_size)
    return tok


def check_corpus_or_sources(data: DataConfig, model_vocab_size: int, corpus_kind: str, sources_kind: str,
                            shipped: str) -> None:
    """The checks shared by pretraining and SFT data: corpus and sources are exclusive, the corpus
    exists, and a given tokenizer fits the model's vocabulary. ConfigError otherwise."""
    if data.corpus is not None and data.sources:
        raise ConfigError(f"data.corpus and data.sources are both set: use corpus for {corpus_kind} or "
                          f"sources for {sources_kind}, not both")
    if data.corpus is not None:
        if not Path(data.corpus).is_file():
            raise ConfigError(f"data.corpus={data.corpus} does not exist: point it at {shipped}")
        if data.tokenizer is not None:
            _load_tokenizer(data.tokenizer, model_vocab_size)


def _prepare_corpus(data: DataConfig, model_vocab_size: int) -> tuple[str, str]:
    """Train/preprocess the raw corpus into the cache if needed; (tokenizer path, prefix)."""
    from .preprocess import preprocess  # imports tqdm/multiprocessing only when needed

    corpus, cache = data.corpus, Path(data.cache_dir)
    key = _file_hash(corpus)
    tokenizer = data.tokenizer
    if tokenizer is None:
        vocab = data.vocab_size or model_vocab_size
        prefix = cache / f"tokenizer-{key}-{data.text_key}-v{vocab}"
        tokenizer = f"{prefix}.model"
        if not Path(tokenizer).is_file():
            train_tokenizer([corpus], str(prefix), vocab, text_key=data.text_key)
    tok = _load_tokenizer(tokenizer, model_vocab_size)
    out = cache / f"corpus-{key}-{data.text_key}-tok{tok.checksum[:12]}"
    if not Path(f"{out}.idx").is_file():
        print(preprocess([corpus], str(out), tokenizer, text_key=data.text_key, progress=False).describe())
    return tokenizer, str(out)


def _split(info: IndexInfo, fraction: float, split: str) -> tuple[IndexInfo, Optional[np.ndarray]]:
    """``info`` restricted to one side of the held-out split (data/heldout.py), and its documents."""
    if not fraction:
        return info, None
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    indexed = IndexedDataset(info.prefix, multimodal=False, mmap=True)
    docs = split_documents(len(indexed.document_indices) - 1, fraction, split)
    tokens = int(document_tokens(indexed.sequence_lengths, indexed.document_indices)[docs].sum())
    return dataclasses.replace(info, num_tokens=tokens, num_documents=len(docs)), docs


def build_train_dataset(data: DataConfig, seed: int, model_vocab_size: int,
                        rank_zero_first: Optional[Callable[[Callable[[], None]], object]] = None,
                        split: str = "train"):
    """Validated training windows for ``data``; see the module docstring.

    ``split="valid"``: the held-out windows instead (``data.valid_fraction`` of the documents, or
    ``data.valid_sources``; data/heldout.py); None when the data config has no validation split.
    ``rank_zero_first(fn)`` must run ``fn`` on global rank 0, barrier, then on the other ranks.
    Raises ConfigError (before any heavy work where the input allows) for bad input.
    """
    seq_len = data.seq_len or DEFAULT_SEQ_LEN
    fraction = data.valid_fraction
    if split == "valid":
        if not (fraction or data.valid_sources):
            return None
        if data.valid_sources:
            if data.tokenizer is None:
                raise ConfigError("data.valid_sources needs data.tokenizer: the tokenizer.model the "
                                  "validation corpora were preprocessed with")
            fraction = 0.0
            data = dataclasses.replace(data, sources=data.valid_sources, corpus=None, synthetic=False)
    if data.synthetic:
        if split == "valid":
            return SyntheticDataset(seq_len, model_vocab_size, seed + SYNTHETIC_VALID_SEED, num_samples=1 << 16)
        return SyntheticDataset(seq_len, model_vocab_size, seed)
    run = rank_zero_first or (lambda fn: fn())
    check_corpus_or_sources(data, model_vocab_size, "raw JSONL", "preprocessed .bin/.idx",
                            "a JSONL file (data/corpus.jsonl ships with the repository)")
    if data.corpus is not None:
        paths: list = []
        run(lambda: paths.append(_prepare_corpus(data, model_vocab_size)))
        tokenizer, prefix = paths[-1]
        sources = [{"path": prefix}]
        name = f"corpus {data.corpus}"
    elif data.sources:
        if data.tokenizer is None:
            raise ConfigError("data.sources needs data.tokenizer: the tokenizer.model the corpora "
                              "were preprocessed with")
        tokenizer, sources, name = data.tokenizer, data.sources, "sources"
    else:
        raise ConfigError("no training data: set data.corpus (raw JSONL, e.g. data/corpus.jsonl), "
                          "data.sources (preprocessed .bin/.idx) or data.synthetic=true")

    # --- validation: cheap, on every rank ----------------------------------------------------
    tok = _load_tokenizer(tokenizer, model_vocab_size)
    specs = parse_sources(sources)
    infos, documents = [], []
    for i, spec in enumerate(specs):
        where = f"data.sources[{i}]" if name == "sources" else f"data.corpus={data.corpus}"
        info = inspect_indexed(spec.path, where)
        _check_size(info, seq_len, where)
        _check_ids(info, tok, where)
        info, docs = _split(info, fraction, split)
        if docs is not None:
            _check_size(info, seq_len, f"{where} ({split} side of data.valid_fraction={fraction})")
        infos.append(info)
        documents.append(docs)
    windows = [windows_per_epoch(info, seq_len) for info in infos]
    weights, length = plan_blend(specs, windows)
    view = TokenizerView(tok.vocab_size, tok.eos_id, tok.checksum)

    # --- index building: rank 0 first (writes the caches), then the others (map them) --------
    built: list = []

    def build() -> None:
        # a lone source serves its windows as they are; a blend needs a little slack per source
        counts = [length] if len(infos) == 1 else samples_per_source(weights, length)
        parts = [packed_source(info, seq_len, seed, n, view, data.cache_dir, docs, f"{split}{fraction:g}")
                 for info, n, docs in zip(infos, counts, documents)]
        if len(parts) == 1:
            inner = parts[0]
        else:
            blends = "blends" if not fraction else f"blends-{split}{fraction:g}"
            inner = blend(parts, weights, length, str(Path(data.cache_dir) / "index-cache" / blends))
        built.append(inner)

    run(build)
    mix = ", ".join(f"{Path(i.prefix).name} w={w:.3g} x{w * length / n:.2f} epochs"
                    for i, w, n in zip(infos, weights, windows))
    summary = (f"{name}: {length:,} windows of {seq_len}+1 tokens, "
               f"{sum(i.num_tokens for i in infos):,} tokens in {sum(i.num_documents for i in infos):,} "
               f"documents [{mix}]; tokenizer vocab {tok.vocab_size} sha256 {tok.checksum[:12]}")
    return TrainDataset(built[-1], length, seq_len, tok, summary)
