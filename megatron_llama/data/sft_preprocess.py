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

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..config.errors import ConfigError
from .chat_template import chat_template
from .indexed import IndexedWriter, strip_suffix, token_dtype
from .jsonl import iter_lines
from .sft_records import OVERLONG_POLICIES, RecordFields, encode_record
from .tokenizer import Tokenizer

FORMAT = "mllama-sft/1"
MAX_REPORTED = 5


def mask_prefix(prefix: str) -> str:
    return f"{strip_suffix(prefix)}.lossmask"


def manifest_path(prefix: str) -> Path:
    return Path(f"{strip_suffix(prefix)}.sft.json")


@dataclass
class SFTSummary:
    output: str
    samples: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)   # reason kind -> count
    bad_examples: list = field(default_factory=list)

    def skip(self, path: str, line: int, reason: str) -> None:
        self.skipped += 1
        kind = reason.split(" (")[0].split(":")[0]  # every reason starts with its kind
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if len(self.bad_examples) < MAX_REPORTED:
            self.bad_examples.append((path, line, reason))

    def describe(self) -> str:
        lines = [f"wrote {self.output}.bin/.idx + .lossmask.bin/.idx + .sft.json: {self.samples:,} samples, "
                 f"{self.tokens:,} tokens ({self.answer_tokens:,} answer tokens), {self.truncated:,} truncated, "
                 f"{self.skipped:,} skipped records; {self.seconds:.1f} s"]
        lines += [f"  skipped {p}:{n}: {why}" for p, n, why in self.bad_examples]
        if self.skipped > len(self.bad_examples):
            lines.append(f"  ... and {self.skipped - len(self.bad_examples):,} more skipped records")
        if self.reasons:
            lines.append("  skipped by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())))
        return "\n".join(lines)


def preprocess_sft(inputs: list[str], output: str, tokenizer: str, template: str = "llama2",
                   fields: RecordFields = RecordFields(), seq_len: Optional[int] = None,
                   overlong: str = "truncate", strict: bool = False, progress: bool = True) -> SFTSummary:
    """Encode SFT records into ``output`` (see the module docstring); returns what was done.

    ``seq_len`` set: samples longer are truncated or dropped now (``overlong``) and counted;
    unset, the trainer applies the same rule with its own ``data.seq_len``.
    """
    if not inputs:
        raise ConfigError("no input files: pass --input FILE.jsonl [...]")
    for p in inputs:
        if not Path(p).is_file():
            raise ConfigError(f"input {p} does not exist: pass JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)")
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"--overlong {overlong!r}: choose one of {', '.join(OVERLONG_POLICIES)}")
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq_len}")
    tpl = chat_template(template)
    tok = Tokenizer.load(tokenizer)
    output = strip_suffix(output)
    summary = SFTSummary(output=output)
    start = time.perf_counter()
    bar = tqdm(desc="preprocess --sft", unit=" records", disable=not progress)
    try:
        with IndexedWriter(output, token_dtype(tok.vocab_size)) as ids_out, \
                IndexedWriter(mask_prefix(output), np.uint8) as mask_out:
            for path in inputs:
                for number, line in enumerate(iter_lines(path), start=1):
                    sample, reason, truncated = encode_record(line, tpl, tok, fields, seq_len, overlong)
                    bar.update(1)
                    if sample is None:
                        if reason is None:
                            continue  # blank line
                        if strict:
                            raise ConfigError(f"{path}:{number}: {reason} (--strict stops at the first bad "
                                              "record; drop --strict to skip and count bad records)")
                        summary.skip(path, number, reason)
                        continue
                    ids, mask = sample
                    n = np.array([len(ids)], dtype=np.int32)
                    ids_out.add(np.asarray(ids), n)
                    mask_out.add(np.asarray(mask, dtype=np.uint8), n)
                    summary.samples += 1
                    summary.tokens += len(ids)
                    summary.answer_tokens += int(sum(mask))
                    summary.truncated += truncated
            if summary.samples == 0:
                first = f" (first: {summary.bad_examples[0][2]})" if summary.bad_examples else ""
                raise ConfigError(f"no usable records in {', '.join(map(str, inputs))}: all {summary.skipped} "
                                  f"non-blank lines were bad{first}; check the field names (--help)")
            summary.seconds = time.perf_counter() - start
            Path(f"{output}.idx").unlink(missing_ok=True)  # no moment with a new mask beside old tokens
            mask_out.finalize()
            info = {"format": FORMAT, "chat_template": tpl.name, "tokenizer_sha256": tok.checksum,
                    "samples": summary.samples, "tokens": summary.tokens,
                    "answer_tokens": summary.answer_tokens, "truncated": summary.truncated,
                    "skipped": summary.skipped, "seq_len": seq_len, "overlong": overlong}
            tmp = manifest_path(output).with_suffix(f".json.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, manifest_path(output))
            ids_out.finalize()
    finally:
        bar.close()
    return summary


def read_manifest(prefix: str, where: str) -> dict:
    """The ``.sft.json`` of an SFT dataset; ConfigError if it is not one."""
    path = manifest_path(prefix)
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found: {strip_suffix(prefix)} is not an SFT dataset; "
                          "make one with `mllama-preprocess --sft`")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{where}: {path} is not valid JSON: preprocess the data again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{where}: {path} is not an {FORMAT} manifest: preprocess the data again")
    return info
