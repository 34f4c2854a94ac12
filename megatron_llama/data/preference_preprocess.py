"""Preference JSONL -> token datasets of both sides, answer masks, margins and a manifest.

* ``PREFIX.bin/.idx``: token ids in the Megatron indexed format, two sequences per pair:
  sequence ``2i`` is pair ``i``'s chosen side, ``2i + 1`` its rejected side (prompt + answer each,
  rendered with the chat template exactly as SFT renders a conversation);
* ``PREFIX.lossmask.bin/.idx``: uint8 answer masks, the same lengths (1 = answer text or its EOS);
* ``PREFIX.margin.npy``: float32 [pairs], 0 where a record gave no margin;
* ``PREFIX.pref.json``: the manifest (format, chat template, tokenizer checksum, counts) that the
  trainer checks at start-up (preference_build.py): a set made with another tokenizer or
  template is refused, never trained on.

Files appear only complete, in the order of ``masked_tokens.py``: masks, margins and manifest
first, the token ``.idx`` (the "finished" marker) last, after an older one was removed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from .chat_template import chat_template
from .indexed import strip_suffix
from .jsonl import iter_lines
from .masked_tokens import (MaskedTokenWriter, SkippedRecords, check_encode_arguments,
                            read_manifest as read_format_manifest, write_atomic, write_manifest)
from .preference_records import OVERLONG_POLICIES, PairFields, encode_pair, parse_pair
from .tokenizer import Tokenizer

FORMAT = "mllama-preference/1"


def manifest_path(prefix: str) -> Path:
    return Path(f"{strip_suffix(prefix)}.pref.json")


def margin_path(prefix: str) -> Path:
    return Path(f"{strip_suffix(prefix)}.margin.npy")


@dataclass
class PreferenceSummary(SkippedRecords):
    output: str
    pairs: int = 0
    tokens: int = 0
    with_margin: int = 0

    def describe(self) -> str:
        lines = [f"wrote {self.output}.bin/.idx + .lossmask.bin/.idx + .margin.npy + .pref.json: {self.pairs:,} "
                 f"pairs ({self.tokens:,} tokens, both sides), {self.with_margin:,} with a margin, "
                 f"{self.truncated:,} truncated, {self.skipped:,} skipped records; {self.seconds:.1f} s"]
        return "\n".join(lines + self.skipped_lines())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
        np.save(f, array)


def preprocess_preference(inputs: list[str], output: str, tokenizer: str, template: str = "llama2",
                          fields: PairFields = PairFields(), seq_len: Optional[int] = None,
                          overlong: str = "truncate", strict: bool = False,
                          progress: bool = True) -> PreferenceSummary:
    """Encode preference records into ``output`` (module docstring); returns what was done."""
    check_encode_arguments(inputs, overlong, seq_len, OVERLONG_POLICIES)
    tpl = chat_template(template)
    tok = Tokenizer.load(tokenizer)
    output = strip_suffix(output)
    summary = PreferenceSummary(output=output)
    margins: list[float] = []
    start = time.perf_counter()
    bar = tqdm(desc="preprocess --preference", unit=" records", disable=not progress)
    try:
        with MaskedTokenWriter(output, tok.vocab_size) as out:
            for path in inputs:
                for number, line in enumerate(iter_lines(path), start=1):
                    bar.update(1)
                    pair, reason = parse_pair(line, fields)
                    sides, truncated = None, False
                    if pair is not None:
                        sides, reason, truncated = encode_pair(pair, tpl, tok, seq_len, overlong)
                    if sides is None:
                        if reason is not None:  # None: a blank line
                            summary.bad_record(path, number, reason, strict)
                        continue
                    for ids, mask in sides:
                        out.add(ids, mask)
                        summary.tokens += len(ids)
                    margins.append(pair.margin)
                    summary.pairs += 1
                    summary.with_margin += pair.margin != 0
                    summary.truncated += truncated
            summary.refuse_if_empty(summary.pairs, inputs, "pairs")
            summary.seconds = time.perf_counter() - start
            info = {"format": FORMAT, "chat_template": tpl.name, "tokenizer_sha256": tok.checksum,
                    "pairs": summary.pairs, "tokens": summary.tokens, "with_margin": summary.with_margin,
                    "truncated": summary.truncated, "skipped": summary.skipped, "skipped_by_reason": summary.reasons,
                    "seq_len": seq_len, "overlong": overlong}

            def side_files() -> None:
                write_atomic(margin_path(output), lambda p: _save_npy(p, np.asarray(margins, np.float32)))
                write_manifest(manifest_path(output), info)
            out.finish(side_files)
    finally:
        bar.close()
    return summary


def read_manifest(prefix: str, where: str) -> dict:
    """The ``.pref.json`` of a preference dataset; ConfigError if it is not one."""
    return read_format_manifest(manifest_path(prefix), prefix, where, FORMAT, "a preference dataset",
                                "--preference")
