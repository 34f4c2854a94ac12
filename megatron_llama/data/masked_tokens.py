"""The masked-token dataset that SFT and preference preprocessing both write, and its manifest.

``PREFIX.bin/.idx`` holds token ids in the Megatron indexed format, ``PREFIX.lossmask.bin/.idx``
a uint8 answer mask of the same sequence lengths, and a JSON manifest names the format, chat
template and tokenizer. Files appear only complete: the old token ``.idx`` (the "finished"
marker the trainer checks) is removed first, then the mask, any side files and the manifest are
renamed into place, and the new token ``.idx`` comes last.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config.errors import ConfigError
from .indexed import IndexedWriter, strip_suffix, token_dtype

MAX_REPORTED = 5  # bad records listed by line number; the rest are only counted


def mask_prefix(prefix: str) -> str:
    return f"{strip_suffix(prefix)}.lossmask"


def check_encode_arguments(inputs: list[str], overlong: str, seq_len: Optional[int],
                           overlong_policies: tuple) -> None:
    """Refuse missing inputs or a bad ``--overlong`` / ``--seq-len`` before anything is opened."""
    if not inputs:
        raise ConfigError("no input files: pass --input FILE.jsonl [...]")
    for p in inputs:
        if not Path(p).is_file():
            raise ConfigError(f"input {p} does not exist: pass JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)")
    if overlong not in overlong_policies:
        raise ConfigError(f"--overlong {overlong!r}: choose one of {', '.join(overlong_policies)}")
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq_len}")


@dataclass(kw_only=True)
class SkippedRecords:
    """What a preprocessing summary counts besides its output: truncated and bad records, with
    examples of the bad ones and their count by kind of reason, and the time taken."""

    truncated: int = 0
    skipped: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)   # reason kind -> count
    bad_examples: list = field(default_factory=list)   # (path, line, reason), at most MAX_REPORTED

    def bad_record(self, path: str, line: int, reason: str, strict: bool) -> None:
        """Count a bad record, or stop at it with ``--strict``."""
        if strict:
            raise ConfigError(f"{path}:{line}: {reason} (--strict stops at the first bad "
                              "record; drop --strict to skip and count bad records)")
        self.skip(path, line, reason)

    def skip(self, path: str, line: int, reason: str) -> None:
        self.skipped += 1
        kind = reason.split(" (")[0].split(":")[0]  # every reason starts with its kind
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if len(self.bad_examples) < MAX_REPORTED:
            self.bad_examples.append((path, line, reason))

    def refuse_if_empty(self, used: int, inputs: list[str], noun: str) -> None:
        if used == 0:
            first = f" (first: {self.bad_examples[0][2]})" if self.bad_examples else ""
            raise ConfigError(f"no usable {noun} in {', '.join(map(str, inputs))}: all {self.skipped} "
                              f"non-blank lines were bad{first}; check the field names (--help)")

    def skipped_lines(self) -> list[str]:
        """The lines after a summary's first: examples of bad records and the count by reason."""
        lines = [f"  skipped {p}:{n}: {why}" for p, n, why in self.bad_examples]
        if self.skipped > len(self.bad_examples):
            lines.append(f"  ... and {self.skipped - len(self.bad_examples):,} more skipped records")
        if self.reasons:
            lines.append("  skipped by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())))
        return lines


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; no partial file is left under either name."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(path: Path, info: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))


def read_manifest(path: Path, prefix: str, where: str, fmt: str, what: str, make_flag: str) -> dict:
    """The manifest at ``path`` of dataset ``prefix`` (``what``, e.g. "an SFT dataset"), checked to
    be of format ``fmt``; ConfigError naming ``where`` and ``mllama-preprocess make_flag`` if not."""
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found: {strip_suffix(prefix)} is not {what}; "
                          f"make one with `mllama-preprocess {make_flag}`")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{where}: {path} is not valid JSON: preprocess the data again") from None
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise ConfigError(f"{where}: {path} is not an {fmt} manifest: preprocess the data again")
    return info


class MaskedTokenWriter:
    """Writes ``PREFIX`` and ``PREFIX.lossmask`` under temporary names, one sequence per ``add``;
    ``finish`` puts them in place in the order of the module docstring. Leaving the ``with`` block
    by an exception (or without ``finish``) removes the temporary files."""

    def __init__(self, output: str, vocab_size: int):
        self.output, self._dtype = strip_suffix(output), token_dtype(vocab_size)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "MaskedTokenWriter":
        with contextlib.ExitStack() as stack:  # a failure opening the mask removes the token files
            self._ids = stack.enter_context(IndexedWriter(self.output, self._dtype))
            self._mask = stack.enter_context(IndexedWriter(mask_prefix(self.output), np.uint8))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        return self._stack.__exit__(*exc)

    def add(self, ids, mask) -> None:
        """One sequence: token ids [n] and its answer mask [n] (1 = trained)."""
        n = np.array([len(ids)], dtype=np.int32)
        self._ids.add(np.asarray(ids), n)
        self._mask.add(np.asarray(mask, dtype=np.uint8), n)

    def finish(self, write_side_files: Callable[[], None]) -> None:
        """Mask, then ``write_side_files()`` (manifest and any others, each atomic), then tokens."""
        Path(f"{self.output}.idx").unlink(missing_ok=True)  # no moment with a new mask beside old tokens
        self._mask.finalize()
        write_side_files()
        self._ids.finalize()
