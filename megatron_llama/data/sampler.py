"""Which samples a DP rank reads: a pure function of (seed, consumed samples, rank, world).

The training stream is an endless sequence of epochs; epoch ``e`` visits every dataset index
once, in the order of a pseudo-random permutation keyed by ``(seed, e)``. A global batch is
the next ``micro_batch_size * dp_size`` positions of that stream after ``consumed_samples``,
and DP rank ``r`` reads its own contiguous slice of them. Hence:

* ranks read disjoint positions, and every index of an epoch is served exactly once;
* resuming from a checkpoint needs only ``consumed_samples`` to continue with exactly the
  batch an uninterrupted run would have read; nothing is stored, nothing is replayed.

The permutation is a Feistel network with cycle walking: O(1) memory and O(batch) work per
call for any dataset size (a materialised permutation of 500M samples would be 4 GB per rank).
"""
from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
import torch

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _hash(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of ``x ^ key``: a cheap, well-mixed round function."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def _round_keys(seed: int, epoch: int) -> tuple:
    return tuple(np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, dtype=np.uint64))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Map ``positions`` (each in [0, n)) through the (seed, epoch) permutation of range(n)."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)  # the domain 4**half is < 4n
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = _round_keys(seed, epoch)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_hash(right, key) & mask)
        return (left << shift) | right

    out = feistel(np.asarray(positions, dtype=np.uint64))
    # Cycle walking: a bijection of [0, 4**half) restricted to [0, n) by re-applying it to the
    # values that fall outside, which stays a bijection of [0, n).
    outside = out >= n
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= n
    return out.astype(np.int64)


def batch_indices(num_samples: int, seed: int, consumed_samples: int, dp_rank: int, dp_size: int,
                  micro_batch_size: int) -> list[int]:
    """Dataset indices of the next micro-batch of DP rank ``dp_rank`` (of ``dp_size``).

    ``consumed_samples`` counts samples over all DP ranks (the global stream position).
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if not 0 <= dp_rank < dp_size or micro_batch_size <= 0 or consumed_samples < 0:
        raise ValueError(f"bad sampler arguments: dp_rank={dp_rank} dp_size={dp_size} "
                         f"micro_batch_size={micro_batch_size} consumed_samples={consumed_samples}")
    start = consumed_samples + dp_rank * micro_batch_size
    positions = np.arange(start, start + micro_batch_size, dtype=np.int64)
    epochs, within = positions // num_samples, positions % num_samples
    out = np.empty(micro_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # a batch can straddle an epoch boundary
        sel = epochs == epoch
        out[sel] = permute(within[sel], num_samples, seed, int(epoch))
    return out.tolist()


class WindowDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...  # int64 [seq_len + 1]


class MicroBatchIterator:
    """Endless ``(tokens, labels)`` micro-batches for one DP rank, int64 ``[mbs, seq_len]``.

    ``consumed_samples`` (global) advances by ``micro_batch_size * dp_size`` per micro-batch;
    save it in the checkpoint and pass it back to resume exactly.
    """

    def __init__(self, dataset: WindowDataset, seed: int, consumed_samples: int, dp_rank: int,
                 dp_size: int, micro_batch_size: int):
        self.dataset, self.seed = dataset, seed
        self.consumed_samples = consumed_samples
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        self.num_samples = len(dataset)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def next_items(self) -> list:
        """The dataset items of this rank's next micro-batch (``micro_batch_size`` of them), in the
        resumable order; advances ``consumed_samples``. SFT and preference iterators share it."""
        indices = batch_indices(self.num_samples, self.seed, self.consumed_samples, self.dp_rank,
                                self.dp_size, self.micro_batch_size)
        items = [self.dataset[i] for i in indices]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return items

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(np.stack(self.next_items()).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}
