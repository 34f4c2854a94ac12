"""The held-out validation split: whole documents, chosen by a hash of their index.

``data.valid_fraction = f`` sends document ``d`` of a corpus to validation when
``hash(d) / 2**64 < f``. The choice depends on nothing but the document index and ``f``: not on
the seed, the layout or the blend, so a document is held out in every run that uses the same
fraction, and the training windows (built only from the other documents) never contain a token
of it. Holding out documents rather than windows matters because packed windows straddle
document boundaries: a window-level split would leak the halves of held-out documents.

Synthetic data has no documents: its validation windows are drawn from another seed.
"""
from __future__ import annotations

import numpy as np

_KEY = np.uint64(0x5DEECE66D2B5A9F1)  # fixed: the split must not move with train.seed
SYNTHETIC_VALID_SEED = 0x7A11D  # offset added to the seed of synthetic validation windows


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: uniform 64-bit values from consecutive indices."""
    x = (x ^ _KEY) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_mask(num_documents: int, fraction: float) -> np.ndarray:
    """bool ``[num_documents]``: True for the documents held out for validation. At least one
    document goes to each side when ``0 < fraction`` and there are two or more documents."""
    mask = np.zeros(num_documents, dtype=bool)
    if fraction <= 0 or num_documents == 0:
        return mask
    with np.errstate(over="ignore"):
        u = _mix(np.arange(num_documents, dtype=np.uint64)).astype(np.float64) / 2.0 ** 64
    mask = u < fraction
    if num_documents >= 2:
        if not mask.any():
            mask[int(np.argmin(u))] = True
        if mask.all():
            mask[int(np.argmax(u))] = False
    return mask


def split_documents(num_documents: int, fraction: float, split: str) -> np.ndarray:
    """Document indices (int32, ascending) of ``split`` ("train" or "valid")."""
    mask = heldout_mask(num_documents, fraction)
    keep = mask if split == "valid" else ~mask
    return np.flatnonzero(keep).astype(np.int32)


def document_tokens(sequence_lengths: np.ndarray, document_indices: np.ndarray) -> np.ndarray:
    """Tokens per document from the index's sequence lengths and document boundaries."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    starts = np.asarray(document_indices[:-1], dtype=np.int64)
    out = np.zeros(len(starts), dtype=np.int64)
    nonempty = starts < np.asarray(document_indices[1:], dtype=np.int64)
    if len(lengths):
        out[nonempty] = np.add.reduceat(lengths, starts[nonempty])
    return out
