"""SFT samples packed into fixed ``seq_len`` rows, with loss targets and segment ids.

Each sample (one conversation from ``mllama-preprocess --sft``) is kept whole inside one row;
samples are shuffled once (seed) and packed next-fit: a row takes samples until the next one
does not fit, the rest of the row is padding. A row is four arrays of ``seq_len``:

* ``tokens``: the samples' ids back to back, then padding (EOS id);
* ``labels``: the next token *within the same sample* (the last token of a sample predicts
  nothing: the next sample's BOS is not its continuation);
* ``answer_mask``: 1 where the label is an answer token (or an answer's EOS), else 0;
* ``segments``: the sample number inside the row (padding: one more segment), which the model
  turns into a block-causal attention mask (``model/document_mask.py``).

Samples longer than ``seq_len`` are truncated or dropped (``data.sft_overlong``); samples with no
answer token left are dropped; both counted in ``describe()``. Rows are then visited by the
same resumable DP-sharded sampler as pretraining windows (``sampler.py``): one epoch = every row
once; ``epoch_steps`` says how many optimizer steps that is.
"""
from __future__ import annotations

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from .sampler import MicroBatchIterator


class PackedSFTDataset:
    """``ds[i]`` -> (tokens, labels, answer_mask, segments), each int64 ``[seq_len]``."""

    def __init__(self, prefixes: list[str], mask_prefixes: list[str], seq_len: int, seed: int,
                 overlong: str, pad_id: int, tokenizer, source: str):
        self.seq_len, self.pad_id, self.tokenizer = seq_len, pad_id, tokenizer
        self.tokens = [IndexedDataset(p, multimodal=False, mmap=True) for p in prefixes]
        self.masks = [IndexedDataset(p, multimodal=False, mmap=True) for p in mask_prefixes]
        # (source, index) of every sample, with its length after the overlong rule
        src = np.concatenate([np.full(len(t), k, dtype=np.int64) for k, t in enumerate(self.tokens)])
        idx = np.concatenate([np.arange(len(t), dtype=np.int64) for t in self.tokens])
        lengths = np.concatenate([t.sequence_lengths.astype(np.int64) for t in self.tokens])
        keep = np.ones(len(lengths), dtype=bool)
        long = np.flatnonzero(lengths > seq_len)
        self.truncated = self.dropped_long = self.dropped_no_answer = 0
        for j in long:
            if overlong == "drop":
                keep[j] = False
                self.dropped_long += 1
            elif not self.masks[src[j]][int(idx[j])][1:seq_len].any():
                keep[j] = False
                self.dropped_no_answer += 1
            else:
                self.truncated += 1
        lengths = np.minimum(lengths, seq_len)
        order = np.random.default_rng(seed).permutation(np.flatnonzero(keep))
        self.src, self.idx, self.lengths = src[order], idx[order], lengths[order]
        self.row_start = self._pack(self.lengths, seq_len)
        self.num_samples = len(order)
        self._source = source

    @staticmethod
    def _pack(lengths: np.ndarray, seq_len: int) -> np.ndarray:
        """Next-fit: first sample of each row, plus the end ([rows + 1])."""
        starts, used = [0], 0
        for j, n in enumerate(lengths.tolist()):
            if used + n > seq_len:
                starts.append(j)
                used = 0
            used += n
        starts.append(len(lengths))
        return np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_start) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range [0, {len(self)})")
        s = self.seq_len
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.zeros(s, dtype=np.int64)
        mask = np.zeros(s, dtype=np.int64)
        segments = np.zeros(s, dtype=np.int64)
        pos = 0
        a, b = int(self.row_start[i]), int(self.row_start[i + 1])
        for seg, j in enumerate(range(a, b)):
            n = int(self.lengths[j])
            ids = self.tokens[self.src[j]][int(self.idx[j])][:n]
            m = self.masks[self.src[j]][int(self.idx[j])][:n]
            tokens[pos:pos + n] = ids
            labels[pos:pos + n - 1] = ids[1:]
            mask[pos:pos + n - 1] = m[1:]
            segments[pos:pos + n] = seg
            pos += n
        segments[pos:] = b - a  # padding: a segment of its own
        return tokens, labels, mask, segments

    def epoch_steps(self, global_batch: int) -> int:
        return -(-len(self) // global_batch)

    def describe(self) -> str:
        used = int(self.lengths.sum())
        eff = used / max(1, len(self) * self.seq_len)
        skipped = []
        if self.truncated:
            skipped.append(f"{self.truncated:,} truncated to seq_len")
        if self.dropped_long:
            skipped.append(f"{self.dropped_long:,} longer than seq_len dropped")
        if self.dropped_no_answer:
            skipped.append(f"{self.dropped_no_answer:,} dropped (no answer left after truncation)")
        note = f"; {', '.join(skipped)}" if skipped else ""
        return (f"{self._source}: {self.num_samples:,} SFT samples packed into {len(self):,} rows of "
                f"{self.seq_len} tokens ({eff:.0%} filled, document-masked attention, loss on answer "
                f"tokens only){note}")


class SFTBatchIterator(MicroBatchIterator):
    """Endless ``(tokens, labels, answer_mask, segments)`` micro-batches [mbs, seq_len] of one DP
    rank; the resumable sample order of ``sampler.MicroBatchIterator`` (same constructor)."""

    def __next__(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*self.next_items()))
