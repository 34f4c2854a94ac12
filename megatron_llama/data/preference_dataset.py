"""Preference pairs for the pair objectives (``train.objective`` reward / dpo), and their batches.

The micro-batch contract (what a pair objective's ``loss`` receives, pipelines/objectives.py)
-------------------------------------------------------------------------------------------
A micro-batch of ``P = train.micro_batch_size`` pairs is a 5-tuple of tensors::

    tokens      int64   [2P, s]  rows 0..P-1: the chosen sides, rows P..2P-1: the rejected sides;
                                 pair i = rows i and P + i; s = data.seq_len, padded with EOS
    labels      int64   [2P, s]  labels[r, t] = tokens[r, t + 1] inside the sample, 0 after it
    loss_mask   float32 [2P, s]  1 at label positions whose label is an answer token (the
                                 answer's closing EOS included), else 0; never 1 on padding
    margin      float32 [P]      the record's margin, 0 when it gave none
    pair_index  int64   [P]      the pair's global index: its position in the concatenated
                                 preprocessed sources (pair k of source j has index
                                 sum(pairs of sources < j) + k), the same in every layout, split,
                                 seq_len and run, so stored per-pair values (DPO's reference
                                 log-probs) can be looked up by it

One sample per row (no packing): attention is plain causal, so nothing but ``tokens`` travels
between pipeline stages; the first stage reads ``tokens``, the head stage
``(labels, loss_mask, margin, pair_index)``. Both sides of a pair are always in the same
micro-batch, hence on the same DP rank; ``global batch = P * grad_accum_steps * dp`` pairs.

Which pairs a DP rank reads is the sampler's pure function of (seed, consumed pairs, DP rank, DP
size) (``sampler.batch_indices`` over the kept pairs), so every layout with the same global batch
trains on the same pairs in the same steps, and a resumed run continues with the next batch
(``consumed_samples`` in the checkpoint counts pairs).

Pairs longer than ``seq_len`` on either side: ``data.preference_overlong`` = ``drop``, or
``truncate`` (both sides cut to ``seq_len``; a pair left without an answer token on a side, or
whose cut sides are identical, is dropped); both counted in ``describe()``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from .sampler import MicroBatchIterator


class PreferenceDataset:
    """``ds[i]`` -> (tokens [2, s], labels [2, s], loss_mask [2, s] float32, margin, pair_index)."""

    def __init__(self, prefixes: list[str], mask_prefixes: list[str], margins: list[np.ndarray],
                 seq_len: int, overlong: str, pad_id: int, source: str,
                 selected: Optional[np.ndarray] = None):
        """``selected``: bool over all global pair indices (the held-out split); None = all."""
        self.seq_len, self.pad_id, self._source = seq_len, pad_id, source
        self.tokens = [IndexedDataset(p, multimodal=False, mmap=True) for p in prefixes]
        self.masks = [IndexedDataset(p, multimodal=False, mmap=True) for p in mask_prefixes]
        counts = [len(t) // 2 for t in self.tokens]
        self.total_pairs = sum(counts)
        self.margin = np.concatenate(margins).astype(np.float32) if margins else np.zeros(0, np.float32)
        src = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(counts)])
        local = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        longest = np.concatenate([t.sequence_lengths.astype(np.int64).reshape(-1, 2).max(axis=1)
                                  for t in self.tokens])
        keep = np.ones(self.total_pairs, dtype=bool) if selected is None else selected.copy()
        self.truncated = self.dropped_long = 0
        for j in np.flatnonzero(keep & (longest > seq_len)):
            if overlong == "drop" or not self._fits_truncated(int(src[j]), int(local[j])):
                keep[j] = False
                self.dropped_long += 1
            else:
                self.truncated += 1
        self.pair_index = np.flatnonzero(keep).astype(np.int64)
        self.src, self.local = src[self.pair_index], local[self.pair_index]

    def _fits_truncated(self, src: int, k: int) -> bool:
        s = self.seq_len
        sides = [(self.tokens[src][2 * k + i][:s], self.masks[src][2 * k + i][:s]) for i in (0, 1)]
        return all(m[1:].any() for _, m in sides) and not np.array_equal(sides[0][0], sides[1][0])

    def __len__(self) -> int:
        return len(self.pair_index)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range [0, {len(self)})")
        s = self.seq_len
        tokens = np.full((2, s), self.pad_id, dtype=np.int64)
        labels = np.zeros((2, s), dtype=np.int64)
        mask = np.zeros((2, s), dtype=np.float32)
        src, k = int(self.src[i]), int(self.local[i])
        for side in (0, 1):
            ids = self.tokens[src][2 * k + side][:s]
            m = self.masks[src][2 * k + side][:s]
            n = len(ids)
            tokens[side, :n] = ids
            labels[side, :n - 1] = ids[1:]
            mask[side, :n - 1] = m[1:]
        g = int(self.pair_index[i])
        return tokens, labels, mask, float(self.margin[g]), g

    def describe(self) -> str:
        notes = []
        if self.truncated:
            notes.append(f"{self.truncated:,} truncated to seq_len")
        if self.dropped_long:
            notes.append(f"{self.dropped_long:,} longer than seq_len dropped")
        note = f"; {', '.join(notes)}" if notes else ""
        return (f"{self._source}: {len(self):,} preference pairs of {self.total_pairs:,}, each side one row of "
                f"{self.seq_len} tokens{note}")

    def epoch_steps(self, global_batch: int) -> int:
        return -(-len(self) // global_batch)


class PreferenceBatchIterator(MicroBatchIterator):
    """Endless micro-batches of one DP rank in the contract above; ``consumed_samples`` counts pairs
    (the resumable order and constructor of ``sampler.MicroBatchIterator``)."""

    def __next__(self) -> tuple[torch.Tensor, ...]:
        items = self.next_items()
        tokens, labels, mask = (torch.from_numpy(np.concatenate([x[j][0:1] for x in items] +
                                                                [x[j][1:2] for x in items]))
                                for j in range(3))
        margin = torch.tensor([x[3] for x in items], dtype=torch.float32)
        pair_index = torch.tensor([x[4] for x in items], dtype=torch.int64)
        return tokens, labels, mask, margin, pair_index
