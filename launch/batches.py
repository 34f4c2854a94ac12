"""Where the trainer's micro-batches come from: the data pipeline (``megatron_llama.data``).

Packed, shuffled, DP-sharded and resumable; ``data.synthetic = true`` feeds reproducible random
ids instead (tests and benchmarks only, never a real run). The sample order is a pure function
of (seed, consumed samples, DP rank, DP size), so every layout with the same global batch trains
on the same samples in the same steps, and a resumed run reads exactly the next batch.
"""
from __future__ import annotations

from typing import Callable, Iterator

from megatron_llama.config import RunConfig
from megatron_llama.data import MicroBatchIterator, build_train_dataset


def open_batches(cfg: RunConfig, consumed_samples: int, dp_rank: int, dp_size: int,
                 rank_zero_first: Callable) -> tuple[Iterator, str]:
    """``(iterator of this DP rank's micro-batches (tokens, labels) [b, s], source description)``;
    with ``data.sft``: micro-batches ``(tokens, labels, answer_mask, segments)``; with a pair objective
    (``train.objective`` reward / dpo): ``(tokens, labels, loss_mask, margin, pair_index)``, the
    contract of megatron_llama/data/preference_dataset.py."""
    if cfg.preference:
        from megatron_llama.data.preference_build import build_preference_dataset
        from megatron_llama.data.preference_dataset import PreferenceBatchIterator
        ds = build_preference_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size, rank_zero_first=rank_zero_first)
        it = PreferenceBatchIterator(ds, cfg.train.seed, consumed_samples, dp_rank, dp_size, cfg.train.micro_batch_size)
        epoch = ds.epoch_steps(cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp_size)
        return iter(it), f"{ds.describe()}; one epoch = {epoch:,} steps"
    if cfg.data.sft:
        from megatron_llama.data.sft_build import build_sft_dataset
        from megatron_llama.data.sft_dataset import SFTBatchIterator
        ds = build_sft_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size, rank_zero_first=rank_zero_first)
        it = SFTBatchIterator(ds, cfg.train.seed, consumed_samples, dp_rank, dp_size, cfg.train.micro_batch_size)
        epoch = ds.epoch_steps(cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp_size)
        return iter(it), f"{ds.describe()}; one epoch = {epoch:,} steps"
    ds = build_train_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size, rank_zero_first=rank_zero_first)
    it = MicroBatchIterator(ds, cfg.train.seed, consumed_samples, dp_rank, dp_size, cfg.train.micro_batch_size)
    return iter(it), ds.describe()
