"""The Megatron indexed dataset on disk: ``<prefix>.bin`` (token ids) + ``<prefix>.idx``.

Byte layout of ``.idx`` (megatron.core.datasets.indexed_dataset, also Megatron-LM / GPT-NeoX)::

    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 S sequences | u64 D
    | i32[S] sequence lengths | i64[S] byte offsets into .bin | i64[D] document boundaries
    (sequence ids, D = documents + 1, first 0, last S) | optional i8[S] modes (multimodal)

Reading is megatron-core's ``IndexedDataset``. Writing is ours: megatron-core's writer computes
the offsets in a Python loop (minutes for 100M documents) and writes in place, while we need
vectorised offsets and a temporary name renamed at the end, so an interrupted run never leaves
a pair of files that looks finished. ``inspect_indexed`` checks a pair cheaply at start-up,
so a truncated or mismatched file is a one-line ConfigError instead of a crash mid-run.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # = 34
# megatron.core.datasets.indexed_dataset.DType, copied so the CLIs start without importing
# megatron-core (seconds); a test checks the two tables agree.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    """uint16 below 65500 ids (LLaMA's 32k), else int32: megatron-core's own choice."""
    return np.uint16 if vocab_size < 65500 else np.int32


def strip_suffix(prefix: str | os.PathLike) -> str:
    """Users often pass ``corpus.bin`` or ``corpus.idx``; the dataset is named by its prefix."""
    s = str(prefix)
    return s[:-4] if s.endswith((".bin", ".idx")) else s


def write_index(idx_path: str | os.PathLike, dtype: type, lengths: np.ndarray,
                document_indices: np.ndarray | None = None) -> None:
    """Write a ``.idx`` for sequences of ``lengths`` tokens stored back to back in the ``.bin``.

    ``document_indices`` defaults to one sequence per document (what GPT pretraining uses).
    """
    lengths = np.asarray(lengths, dtype=np.int32)
    if document_indices is None:
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_indices)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())


class IndexedWriter:
    """Append documents to ``<prefix>.bin``/``.idx`` under temporary names; ``finalize`` renames.

    Use as a context manager: leaving the block by an exception deletes the temporary files.
    """

    def __init__(self, prefix: str, dtype: type):
        self.prefix, self.dtype = strip_suffix(prefix), dtype
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self.tmp_bin, self.tmp_idx = f"{self.prefix}.bin{tag}", f"{self.prefix}.idx{tag}"
        self._bin = open(self.tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        write_index(self.tmp_idx, self.dtype, lengths)
        # The .idx is the "finished" marker: drop an old one first, rename the new one last,
        # so no moment exists where a new .bin sits beside a stale .idx (or the reverse).
        Path(f"{self.prefix}.idx").unlink(missing_ok=True)
        os.replace(self.tmp_bin, f"{self.prefix}.bin")
        os.replace(self.tmp_idx, f"{self.prefix}.idx")

    def abort(self) -> None:
        self._bin.close()
        for p in (self.tmp_bin, self.tmp_idx):
            Path(p).unlink(missing_ok=True)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass
class IndexInfo:
    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def inspect_indexed(prefix: str, what: str = "dataset") -> IndexInfo:
    """Check that ``prefix`` is a complete, self-consistent .bin/.idx pair; ConfigError if not.

    Costs O(sequences) on the index (milliseconds for millions of documents), never reads .bin.
    """
    prefix = strip_suffix(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise ConfigError(f"{what}: {p} not found: preprocess the corpus with `mllama-preprocess "
                              f"--input FILE.jsonl --output {prefix}` (path is the prefix, no suffix)")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != MAGIC:
        raise ConfigError(f"{what}: {idx} is not a Megatron index (bad header or truncated): "
                          "preprocess the corpus again")
    version, code = struct.unpack("<Q", head[9:17])[0], head[17]
    if version != 1 or code not in DTYPE_CODES:
        raise ConfigError(f"{what}: {idx} has unknown version {version} / dtype code {code}: "
                          "not a Megatron .idx; preprocess the corpus again")
    dtype = DTYPE_CODES[code]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + n_seq * 12 + n_doc * 8
    if size not in (expected, expected + n_seq):  # + n_seq: multimodal mode bytes
        raise ConfigError(f"{what}: {idx} is truncated or corrupt ({size} bytes, header says "
                          f"{expected}): preprocess the corpus again")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, np.int32, n_seq, HEADER_BYTES)
    pointers = np.frombuffer(mm, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
    docs = np.frombuffer(mm, np.int64, n_doc, HEADER_BYTES + 12 * n_seq)
    num_tokens = int(lengths.sum(dtype=np.int64))
    item = np.dtype(dtype).itemsize
    last_ok = n_seq == 0 or int(pointers[-1]) == (num_tokens - int(lengths[-1])) * item
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or not last_ok:
        raise ConfigError(f"{what}: {idx} is internally inconsistent (offsets or document "
                          "boundaries do not add up): preprocess the corpus again")
    bin_size = bin_.stat().st_size
    if bin_size != num_tokens * item:
        raise ConfigError(f"{what}: {bin_} has {bin_size} bytes but {idx} describes {num_tokens} "
                          f"{np.dtype(dtype).name} tokens = {num_tokens * item} bytes: the index does "
                          "not match its data file (truncated copy, or from another run); "
                          "preprocess again or copy both files together")
    del mm
    return IndexInfo(prefix, dtype, n_seq, n_doc - 1, num_tokens)
