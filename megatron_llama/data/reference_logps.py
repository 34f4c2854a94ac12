"""DPO's stored reference pass: the reference model's log-probs of every pair, beside the dataset.

One ``.npz`` per (reference model, preference split), next to the split's first source::

    <source>.dpo-ref-<split>-<key>.npz
        logps  float64 [total_pairs, 2]   (chosen, rejected) log-prob of the answer tokens of pair
                                          ``pair_index``; NaN for pairs the split does not hold
        key    JSON: model_sha256, data_sha256, pairs_sha256, pairs

``model_sha256`` identifies the weights (checkpoint/fingerprint.py); ``data_sha256`` the bytes of
the split's token and loss-mask files; ``pairs_sha256`` which pairs it keeps (the held-out split,
drops of over-long pairs) and ``seq_len`` (truncation changes the log-probs). The file name
carries the model and pair-selection checksums; a stored file whose key differs from the run's
(e.g. the data were preprocessed again in place) is refused in one line. Written atomically.

Why a stored pass and not a frozen co-resident reference model: the reference's log-probs of a
pair never change during training, so computing them once costs one forward pass over the data
(about a third of one training epoch's compute) instead of a forward pass per step, holds no
second copy of the weights (a 7B bf16 reference is 13.5 GB per model replica, split over TP x PP),
and the stored numbers are layout-free: a run resumed or resharded to another TP x PP x DP reads
the same file. Cost measured in bench/results/dpo_reference_pass.json (bench/dpo_reference_pass.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError


def data_checksum(dataset) -> str:
    """sha256 of the bytes of a PreferenceDataset's token and loss-mask files."""
    h = hashlib.sha256()
    for ds in [*dataset.tokens, *dataset.masks]:
        for suffix in (".bin", ".idx"):
            with open(ds.path_prefix + suffix, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def pairs_checksum(dataset) -> str:
    """sha256 of which pairs a PreferenceDataset keeps (split, over-long drops) and its seq_len."""
    h = hashlib.sha256(np.ascontiguousarray(dataset.pair_index, dtype=np.int64).tobytes())
    h.update(f"seq_len={dataset.seq_len}".encode())
    return h.hexdigest()


def make_key(model_sha256: str, dataset) -> dict:
    return {"model_sha256": model_sha256, "data_sha256": data_checksum(dataset),
            "pairs_sha256": pairs_checksum(dataset), "pairs": int(len(dataset))}


def default_path(dataset, split: str, key: dict) -> Path:
    """Named by the reference model and the pair selection; the data's bytes are checked inside."""
    prefix = dataset.tokens[0].path_prefix
    return Path(f"{prefix}.dpo-ref-{split}-m{key['model_sha256'][:12]}-p{key['pairs_sha256'][:12]}.npz")


def load(path: Path, key: dict, where: str) -> np.ndarray:
    """The stored log-probs [total_pairs, 2] of ``path``; ConfigError when it is not for ``key``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            logps, stored = f["logps"], json.loads(str(f["key"]))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{where} {path} is not readable ({e!s:.80}): delete it to compute a new reference "
                          "pass") from None
    for name, what in (("model_sha256", "reference model"), ("data_sha256", "preference data"),
                       ("pairs_sha256", "selection of pairs"), ("pairs", "number of pairs")):
        if stored.get(name) != key[name]:
            raise ConfigError(f"{where} {path} was computed for another {what} ({name} {str(stored.get(name))[:12]}, "
                              f"this run has {str(key[name])[:12]}): delete it to compute a new reference pass")
    if logps.ndim != 2 or logps.shape[1] != 2:
        raise ConfigError(f"{where} {path} holds an array of shape {logps.shape}, not [pairs, 2]: delete it to "
                          "compute a new reference pass")
    return logps


def save(path: Path, key: dict, logps: np.ndarray) -> None:
    """Write atomically: a reader sees the whole file or none."""
    buf = io.BytesIO()
    np.savez(buf, logps=np.asarray(logps, dtype=np.float64), key=np.asarray(json.dumps(key, sort_keys=True)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
