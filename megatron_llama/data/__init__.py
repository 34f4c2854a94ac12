"""Pretraining data: tokenizer, indexed datasets, packing, blending, DP-sharded sampling.

The trainer needs only what is exported here; see each module for the why.
"""
from .build import SyntheticDataset, TrainDataset, build_train_dataset
from .sampler import MicroBatchIterator, batch_indices
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["Tokenizer", "train_tokenizer", "build_train_dataset", "batch_indices",
           "MicroBatchIterator", "TrainDataset", "SyntheticDataset"]
