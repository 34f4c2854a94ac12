"""Where the trainer's micro-batches come from.

The real source is the data pipeline (``megatron_llama.data``: packed, shuffled, DP-sharded,
resumable). ``data.synthetic = true`` feeds deterministic synthetic sequences instead: for tests
and benchmarks only, never for a real run. Until the data package exists, the synthetic source
and the DP-sharded iterator below stand in for it.

Global order (the contract both implementations keep): optimizer step k consumes samples
``[k*G, (k+1)*G)`` with G = micro_batch * grad_accum * dp; micro-batch j of the step is the slice
``[j*b*dp, (j+1)*b*dp)`` of it, of which DP rank r reads ``[r*b, (r+1)*b)``. Every layout with the
same global batch therefore trains on the same samples in the same steps.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from megatron_llama.config import ConfigError, RunConfig


class SyntheticSequences:
    """Deterministic, learnable token sequences (tests and benchmarks only).

    Sample i is an arithmetic progression modulo the vocabulary with a start and a small stride
    drawn from (seed, i): a model can learn to continue it, so the loss visibly falls.
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int, num_samples: int = 1 << 40):
        self.vocab_size, self.seq_len, self.seed, self.num_samples = vocab_size, seq_len, seed, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(i)])
        start, stride = int(rng.integers(self.vocab_size)), int(rng.integers(1, 8))
        return (start + stride * np.arange(self.seq_len + 1, dtype=np.int64)) % self.vocab_size

    def describe(self) -> str:
        return f"SYNTHETIC arithmetic sequences (tests/benchmarks only), seq_len {self.seq_len}"


def sharded_micro_batches(dataset, consumed_samples: int, dp_rank: int, dp_size: int,
                          micro_batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's micro-batches ``(tokens, labels)`` int64 [b, s], from ``consumed_samples`` on."""
    pos = consumed_samples
    while True:
        first = pos + dp_rank * micro_batch_size
        rows = np.stack([dataset[(first + k) % len(dataset)] for k in range(micro_batch_size)])
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
        pos += micro_batch_size * dp_size


def open_batches(cfg: RunConfig, consumed_samples: int, dp_rank: int, dp_size: int,
                 rank_zero_first: Callable) -> tuple[Iterator, str]:
    """``(iterator of this DP rank's micro-batches, description of the source)``."""
    try:
        from megatron_llama.data import MicroBatchIterator, build_train_dataset
    except ImportError:
        if not cfg.data.synthetic:
            raise ConfigError("the data pipeline (megatron_llama.data) is not installed in this checkout:"
                              " set data.synthetic=true for a synthetic smoke run") from None
        ds = SyntheticSequences(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.seed)
        return sharded_micro_batches(ds, consumed_samples, dp_rank, dp_size, cfg.train.micro_batch_size), \
            ds.describe()
    ds = build_train_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size, rank_zero_first=rank_zero_first)
    it = MicroBatchIterator(ds, cfg.train.seed, consumed_samples, dp_rank, dp_size, cfg.train.micro_batch_size)
    return iter(it), ds.describe()
