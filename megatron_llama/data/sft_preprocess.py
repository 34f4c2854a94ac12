"""SFT JSONL -> three files next to each other, each readable on its own:

* ``PREFIX.bin/.idx``: the token ids, one sequence per sample, in the Megatron indexed format
  (megatron-core's ``IndexedDataset`` reads them as it reads a pretraining corpus);
* ``PREFIX.lossmask.bin/.idx``: the answer mask, a uint8 indexed dataset with the same sequence
  lengths (``mask[i] = 1``: token ``i`` is answer text or the EOS closing an answer, so the
  prediction of token ``i`` from token ``i-1`` is trained);
* ``PREFIX.sft.json``: what the pair is (format, chat template, tokenizer checksum, counts).

Files appear only complete: both indexed pairs are written under temporary names, the mask
and the manifest renamed first and the token ``.idx`` (the "finished" marker the trainer
checks) last, after an older one was removed. One process: SFT sets are small next to
pretraining corpora (100k conversations encode in seconds).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .chat_template import chat_template
from .indexed import strip_suffix
from .jsonl import iter_lines
from .masked_tokens import mask_prefix  # noqa: F401 - importers of SFT data name it here too
from .masked_tokens import (MaskedTokenWriter, SkippedRecords, check_encode_arguments,
                            read_manifest as read_format_manifest, write_manifest)
from .sft_records import OVERLONG_POLICIES, RecordFields, encode_record
from .tokenizer import Tokenizer

FORMAT = "mllama-sft/1"

def manifest_path(prefix: str) -> Path:
    return Path(f"{strip_suffix(prefix)}.sft.json")


@dataclass
class SFTSummary(SkippedRecords):
    output: str
    samples: int = 0
    tokens: int = 0
    answer_tokens: int = 0

    def describe(self) -> str:
        lines = [f"wrote {self.output}.bin/.idx + .lossmask.bin/.idx + .sft.json: {self.samples:,} samples, "
                 f"{self.tokens:,} tokens ({self.answer_tokens:,} answer tokens), {self.truncated:,} truncated, "
                 f"{self.skipped:,} skipped records; {self.seconds:.1f} s"]
        return "\n".join(lines + self.skipped_lines())


def preprocess_sft(inputs: list[str], output: str, tokenizer: str, template: str = "llama2",
                   fields: RecordFields = RecordFields(), seq_len: Optional[int] = None,
                   overlong: str = "truncate", strict: bool = False, progress: bool = True) -> SFTSummary:
    """Encode SFT records into ``output`` (see the module docstring); returns what was done.

    ``seq_len`` set: samples longer are truncated or dropped now (``overlong``) and counted;
    unset, the trainer applies the same rule with its own ``data.seq_len``.
    """
    check_encode_arguments(inputs, overlong, seq_len, OVERLONG_POLICIES)
    tpl = chat_template(template)
    tok = Tokenizer.load(tokenizer)
    output = strip_suffix(output)
    summary = SFTSummary(output=output)
    start = time.perf_counter()
    bar = tqdm(desc="preprocess --sft", unit=" records", disable=not progress)
    try:
        with MaskedTokenWriter(output, tok.vocab_size) as out:
            for path in inputs:
                for number, line in enumerate(iter_lines(path), start=1):
                    sample, reason, truncated = encode_record(line, tpl, tok, fields, seq_len, overlong)
                    bar.update(1)
                    if sample is None:
                        if reason is not None:  # None: a blank line
                            summary.bad_record(path, number, reason, strict)
                        continue
                    ids, mask = sample
                    out.add(ids, mask)
                    summary.samples += 1
                    summary.tokens += len(ids)
                    summary.answer_tokens += int(sum(mask))
                    summary.truncated += truncated
            summary.refuse_if_empty(summary.samples, inputs, "records")
            summary.seconds = time.perf_counter() - start
            info = {"format": FORMAT, "chat_template": tpl.name, "tokenizer_sha256": tok.checksum,
                    "samples": summary.samples, "tokens": summary.tokens,
                    "answer_tokens": summary.answer_tokens, "truncated": summary.truncated,
                    "skipped": summary.skipped, "seq_len": seq_len, "overlong": overlong}
            out.finish(lambda: write_manifest(manifest_path(output), info))
    finally:
        bar.close()
    return summary


def read_manifest(prefix: str, where: str) -> dict:
    """The ``.sft.json`` of an SFT dataset; ConfigError if it is not one."""
    return read_format_manifest(manifest_path(prefix), prefix, where, FORMAT, "an SFT dataset", "--sft")
