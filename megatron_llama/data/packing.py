"""One corpus -> shuffled windows of ``seq_len + 1`` tokens: megatron-core's ``GPTDataset``.

GPTDataset is exactly the LLaMA/Qwen recipe: documents (each already ending in EOS, written by
``mllama-preprocess``) are shuffled, concatenated, and cut into windows that cross document
boundaries; window ``k`` covers tokens ``[k*seq_len, (k+1)*seq_len]`` (one token of overlap, so
inputs and labels both have ``seq_len`` tokens). Asking for more samples than one epoch holds
concatenates several epochs, each with its own document shuffle. The three index arrays are
built by its C++ helper (``helpers_cpp``, shipped in the wheel) and cached as ``.npy`` files,
so rank 0 builds them once and every other rank, and every later run, memory-maps them.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from .indexed import IndexInfo

# megatron-core logs every index load (and "not cached" notes); describe() says what matters.
logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)


class TokenizerView:
    """The few tokenizer attributes GPTDatasetConfig reads (vocab size, EOD, pad, cache identity).

    pad = -1 is an id no corpus contains, so GPTDataset never masks or rewrites a real token.
    """

    def __init__(self, vocab_size: int, eod: int, checksum: str = ""):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, -1
        self.unique_identifiers = {"class": "Tokenizer", "vocab_size": vocab_size, "eod": eod,
                                   "sha256": checksum}


def gpt_config(seq_len: int, seed: int, tokenizer: TokenizerView, prefix: str,
               cache_dir: str | None) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=([prefix], None), split="1,0,0",
        path_to_cache=cache_dir, tokenizer=tokenizer, mmap_bin_files=True,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,  # the model uses causal SDPA; no [s, s] mask per sample
        mid_level_dataset_surplus=0.005)


def windows_per_epoch(info: IndexInfo, seq_len: int) -> int:
    """Windows one pass over the corpus yields (the last partial window is dropped)."""
    return max(0, (info.num_tokens - 1) // seq_len)


def index_cache_dir(cache_root: str, info: IndexInfo) -> str:
    """Per-corpus cache folder keyed by the files' identity, not only their path.

    megatron-core keys its cache by path + parameters; a corpus preprocessed again under the
    same name would otherwise silently reuse indices that point into the old file.
    """
    st_idx, st_bin = os.stat(f"{info.prefix}.idx"), os.stat(f"{info.prefix}.bin")
    ident = f"{os.path.abspath(info.prefix)}|{st_idx.st_size}|{st_idx.st_mtime_ns}|{st_bin.st_size}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return str(Path(cache_root) / "index-cache" / f"{Path(info.prefix).name}-{key}")


def packed_source(info: IndexInfo, seq_len: int, seed: int, num_samples: int,
                  tokenizer: TokenizerView, cache_root: str, documents: np.ndarray | None = None,
                  split: str = "") -> GPTDataset:
    """A GPTDataset over the corpus (or only ``documents``, one side of data/heldout.py's split,
    named ``split``) with at least ``num_samples`` windows."""
    indexed = IndexedDataset(info.prefix, multimodal=False, mmap=True)
    cache = index_cache_dir(cache_root, info)
    if documents is None:
        documents = np.arange(len(indexed), dtype=np.int32)
    else:  # megatron-core's cache key ignores the document subset: give each split its own folder
        cache += f"-{split}"
    config = gpt_config(seq_len, seed, tokenizer, info.prefix, cache)
    return GPTDataset(indexed, info.prefix, documents, num_samples, Split.train, config)


def window(sample: dict) -> np.ndarray:
    """A GPTDataset sample (tokens = w[:-1], labels = w[1:]) -> the window ``w``, int64 [seq_len+1]."""
    tokens, labels = sample["tokens"], sample["labels"]
    return np.concatenate([tokens.numpy(), labels[-1:].numpy()]).astype(np.int64, copy=False)
