"""JSONL corpus -> Megatron indexed dataset (``.bin``/``.idx``), EOS appended to every document.

The reader (this process) cuts the input into ~1 MB chunks of lines; a pool of workers parses
and tokenises them (the tokenizer's batch encode: one native call per chunk, one thread per
worker, so ``workers`` is the number of cores used); the writer (this
process again) appends their results in input order. At most ``2 * workers`` chunks are in
flight, so memory stays flat however large the corpus. Output goes to temporary names and is
renamed only when everything succeeded (see ``indexed.IndexedWriter``).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from ..config.errors import ConfigError
from ..config.paths import output_prefix
from .indexed import IndexedWriter, token_dtype
from .jsonl import lines_of, open_binary, parse_line
from .tokenizer import Tokenizer

MAX_REPORTED = 5  # bad lines listed by line number; the rest are only counted


@dataclass
class Chunk:
    path: str
    first_line: int     # 1-based line number of lines[0]
    lines: list[bytes]
    raw_pos: int        # position in the (possibly compressed) file after this chunk: progress


@dataclass
class Encoded:
    tokens: np.ndarray      # [sum(lengths)] all documents of the chunk back to back, EOS included
    lengths: np.ndarray     # [documents] int32
    bad: list[tuple[str, int, str]]  # (path, line, reason) of every bad line
    input_bytes: int


@dataclass
class Summary:
    output: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    bad_examples: list[tuple[str, int, str]] = field(default_factory=list)

    def describe(self) -> str:
        mb = self.input_bytes / 1e6
        lines = [f"wrote {self.output}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens, "
                 f"{self.skipped:,} skipped lines; {mb:.1f} MB in {self.seconds:.1f} s "
                 f"({mb / max(self.seconds, 1e-9):.2f} MB/s)"]
        lines += [f"  skipped {p}:{n}: {why}" for p, n, why in self.bad_examples]
        if self.skipped > len(self.bad_examples):
            lines.append(f"  ... and {self.skipped - len(self.bad_examples):,} more skipped lines")
        return "\n".join(lines)


def read_chunks(paths: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    """Lines of every input, grouped into chunks of about ``chunk_bytes`` bytes."""
    for path in paths:
        stream, raw = open_binary(path)
        with raw, stream:
            lines: list[bytes] = []
            size, first = 0, 1
            for number, line in enumerate(lines_of(stream, path), start=1):
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield Chunk(path, first, lines, raw.tell())
                    lines, size, first = [], 0, number + 1
            if lines:
                yield Chunk(path, first, lines, raw.tell())


_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str, chunk_memo: bool = True) -> None:
    global _TOKENIZER
    # tokenizers' batch encode would start its own thread pool in every worker: the pool of
    # workers is the parallelism (and a forked Rust pool can deadlock).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = Tokenizer.load(tokenizer_path)
    if not chunk_memo and getattr(_TOKENIZER, "chunk_memo", None) is not None:
        _TOKENIZER.chunk_memo = None


def encode_chunk(chunk: Chunk, text_key: str) -> Encoded:
    """Parse, validate and tokenise one chunk (runs in a worker)."""
    tok = _TOKENIZER
    texts, bad = [], []
    for offset, line in enumerate(chunk.lines):
        text, reason = parse_line(line, text_key)
        if text is not None:
            texts.append(text)
        elif reason is not None:
            bad.append((chunk.path, chunk.first_line + offset, reason))
    tokens, lengths = tok.encode_documents(texts, token_dtype(tok.vocab_size))
    return Encoded(tokens, lengths, bad, sum(map(len, chunk.lines)))


def preprocess(inputs: list[str], output: str, tokenizer: str, text_key: str = "text",
               workers: Optional[int] = None, strict: bool = False, chunk_bytes: int = 1 << 20,
               progress: bool = True, chunk_memo: bool = True) -> Summary:
    """Tokenise ``inputs`` into ``<output>.bin/.idx``; returns what was done.

    Bad lines are skipped and counted (``strict``: the first one raises ConfigError and nothing
    is written). A corpus without a single good document raises ConfigError. ``chunk_memo``
    False: a byte-level BPE encodes without its chunk memo (same ids, slower; the benchmark's
    reference).
    """
    if not inputs:
        raise ConfigError("no input files: pass --input FILE.jsonl [FILE2.jsonl.gz ...]")
    for p in inputs:
        if not Path(p).is_file():
            raise ConfigError(f"input {p} does not exist: pass JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)")
    if chunk_bytes < 1 or (workers is not None and workers < 1):
        raise ConfigError(f"--workers must be >= 1 and --chunk-mb > 0, got {workers} and {chunk_bytes / 1e6:g}")
    output_prefix(output, "--output")
    tok = Tokenizer.load(tokenizer)  # fail here, not inside a worker
    workers = max(1, workers or os.cpu_count() or 1)
    summary = Summary(output=output)
    start = time.perf_counter()
    bar = tqdm(total=sum(Path(p).stat().st_size for p in inputs), unit="B", unit_scale=True,
               unit_divisor=1000, desc="preprocess", disable=not progress, smoothing=0.1)
    done_bytes = {p: 0 for p in inputs}

    def consume(chunk: Chunk, enc: Encoded, writer: IndexedWriter) -> None:
        if enc.bad and strict:
            path, line, why = enc.bad[0]
            raise ConfigError(f"{path}:{line}: {why} (--strict stops at the first bad line; drop "
                              "--strict to skip and count bad lines)")
        writer.add(enc.tokens, enc.lengths)
        summary.documents += len(enc.lengths)
        summary.tokens += int(enc.lengths.sum())
        summary.skipped += len(enc.bad)
        summary.input_bytes += enc.input_bytes
        room = MAX_REPORTED - len(summary.bad_examples)
        summary.bad_examples += enc.bad[:max(room, 0)]
        bar.update(chunk.raw_pos - done_bytes[chunk.path])
        done_bytes[chunk.path] = chunk.raw_pos
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(docs_per_s=f"{summary.documents / elapsed:,.0f}", skipped=summary.skipped,
                        refresh=False)

    try:
        with IndexedWriter(output, token_dtype(tok.vocab_size)) as writer:
            chunks = read_chunks(list(map(str, inputs)), chunk_bytes)
            if workers == 1:  # in-process: no pickling, and what the per-worker benchmark measures
                before = os.environ.get("TOKENIZERS_PARALLELISM")
                _init_worker(tokenizer, chunk_memo)
                try:
                    for chunk in chunks:
                        consume(chunk, encode_chunk(chunk, text_key), writer)
                finally:
                    if before is None:
                        os.environ.pop("TOKENIZERS_PARALLELISM", None)
                    else:
                        os.environ["TOKENIZERS_PARALLELISM"] = before
            else:
                # fork, not spawn: spawn re-runs the caller's __main__ in every worker (a training
                # script without a main guard would recurse); workers touch only the tokenizer and numpy.
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                with ctx.Pool(workers, _init_worker, (tokenizer, chunk_memo)) as pool:
                    pending: deque = deque()
                    for chunk in chunks:
                        pending.append((chunk, pool.apply_async(encode_chunk, (chunk, text_key))))
                        if len(pending) >= 2 * workers:
                            c, res = pending.popleft()
                            consume(c, res.get(), writer)
                    while pending:
                        c, res = pending.popleft()
                        consume(c, res.get(), writer)
            summary.seconds = time.perf_counter() - start
            if summary.documents == 0:
                first = f" (first: {summary.bad_examples[0][2]})" if summary.bad_examples else ""
                raise ConfigError(f"no documents in {', '.join(map(str, inputs))}: all {summary.skipped} "
                                  f"non-blank lines were bad{first}; check --text-key")
            writer.finalize()
    finally:
        bar.close()
    return summary
