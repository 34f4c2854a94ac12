"""Pretraining data: tokenizer, indexed datasets, packing, blending, DP-sharded sampling.

The trainer needs only what is exported here; see each module for the why. Exports resolve
lazily: the CLIs and the corpus generator start without importing torch or megatron-core.
"""
from importlib import import_module

_EXPORTS = {
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "build_train_dataset": "build", "TrainDataset": "build", "SyntheticDataset": "build",
    "batch_indices": "sampler", "MicroBatchIterator": "sampler",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
