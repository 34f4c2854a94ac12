"""Preference JSONL -> token datasets of both sides, answer masks, margins and a manifest.

* ``PREFIX.bin/.idx``: token ids in the Megatron indexed format, two sequences per pair:
  sequence ``2i`` is pair ``i``'s chosen side, ``2i + 1`` its rejected side (prompt + answer each,
  rendered with the chat template exactly as SFT renders a conversation);
* ``PREFIX.lossmask.bin/.idx``: uint8 answer masks, the same lengths (1 = answer text or its EOS);
* ``PREFIX.margin.npy``: float32 [pairs], 0 where a record gave no margin;
* ``PREFIX.pref.json``: the manifest (format, chat template, tokenizer checksum, counts) that the
  trainer checks at start-up (preference_build.py): a set made with another tokenizer or
  template is refused, never trained on.

Files appear only complete, in the order of ``sft_preprocess.py``: masks, margins and manifest
first, the token ``.idx`` (the "finished" marker) last, after an older one was removed.
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
from .preference_records import OVERLONG_POLICIES, PairFields, encode_pair, parse_pair
from .sft_preprocess import mask_prefix
from .tokenizer import Tokenizer

FORMAT = "mllama-preference/1"
MAX_REPORTED = 5


def manifest_path(prefix: str) -> Path:
    return Path(f"{strip_suffix(prefix)}.pref.json")


def margin_path(prefix: str) -> Path:
    return Path(f"{strip_suffix(prefix)}.margin.npy")


@dataclass
class PreferenceSummary:
    output: str
    pairs: int = 0
    tokens: int = 0
    with_margin: int = 0
    truncated: int = 0
    skipped: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)
    bad_examples: list = field(default_factory=list)

    def skip(self, path: str, line: int, reason: str) -> None:
        self.skipped += 1
        kind = reason.split(" (")[0].split(":")[0]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if len(self.bad_examples) < MAX_REPORTED:
            self.bad_examples.append((path, line, reason))

    def describe(self) -> str:
        lines = [f"wrote {self.output}.bin/.idx + .lossmask.bin/.idx + .margin.npy + .pref.json: {self.pairs:,} "
                 f"pairs ({self.tokens:,} tokens, both sides), {self.with_margin:,} with a margin, "
                 f"{self.truncated:,} truncated, {self.skipped:,} skipped records; {self.seconds:.1f} s"]
        lines += [f"  skipped {p}:{n}: {why}" for p, n, why in self.bad_examples]
        if self.skipped > len(self.bad_examples):
            lines.append(f"  ... and {self.skipped - len(self.bad_examples):,} more skipped records")
        if self.reasons:
            lines.append("  skipped by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())))
        return "\n".join(lines)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
        np.save(f, array)


def preprocess_preference(inputs: list[str], output: str, tokenizer: str, template: str = "llama2",
                          fields: PairFields = PairFields(), seq_len: Optional[int] = None,
                          overlong: str = "truncate", strict: bool = False,
                          progress: bool = True) -> PreferenceSummary:
    """Encode preference records into ``output`` (module docstring); returns what was done."""
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
    summary = PreferenceSummary(output=output)
    margins: list[float] = []
    start = time.perf_counter()
    bar = tqdm(desc="preprocess --preference", unit=" records", disable=not progress)
    try:
        with IndexedWriter(output, token_dtype(tok.vocab_size)) as ids_out, \
                IndexedWriter(mask_prefix(output), np.uint8) as mask_out:
            for path in inputs:
                for number, line in enumerate(iter_lines(path), start=1):
                    bar.update(1)
                    pair, reason = parse_pair(line, fields)
                    sides, truncated = None, False
                    if pair is not None:
                        sides, reason, truncated = encode_pair(pair, tpl, tok, seq_len, overlong)
                    if sides is None:
                        if reason is None:
                            continue  # blank line
                        if strict:
                            raise ConfigError(f"{path}:{number}: {reason} (--strict stops at the first bad "
                                              "record; drop --strict to skip and count bad records)")
                        summary.skip(path, number, reason)
                        continue
                    for ids, mask in sides:
                        n = np.array([len(ids)], dtype=np.int32)
                        ids_out.add(np.asarray(ids), n)
                        mask_out.add(np.asarray(mask, dtype=np.uint8), n)
                        summary.tokens += len(ids)
                    margins.append(pair.margin)
                    summary.pairs += 1
                    summary.with_margin += pair.margin != 0
                    summary.truncated += truncated
            if summary.pairs == 0:
                first = f" (first: {summary.bad_examples[0][2]})" if summary.bad_examples else ""
                raise ConfigError(f"no usable pairs in {', '.join(map(str, inputs))}: all {summary.skipped} "
                                  f"non-blank lines were bad{first}; check the field names (--help)")
            summary.seconds = time.perf_counter() - start
            Path(f"{output}.idx").unlink(missing_ok=True)  # no moment with new masks beside old tokens
            mask_out.finalize()
            _write_atomic(margin_path(output), lambda p: _save_npy(p, np.asarray(margins, np.float32)))
            info = {"format": FORMAT, "chat_template": tpl.name, "tokenizer_sha256": tok.checksum,
                    "pairs": summary.pairs, "tokens": summary.tokens, "with_margin": summary.with_margin,
                    "truncated": summary.truncated, "skipped": summary.skipped, "skipped_by_reason": summary.reasons,
                    "seq_len": seq_len, "overlong": overlong}
            _write_atomic(manifest_path(output), lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
            ids_out.finalize()
    finally:
        bar.close()
    return summary


def read_manifest(prefix: str, where: str) -> dict:
    """The ``.pref.json`` of a preference dataset; ConfigError if it is not one."""
    path = manifest_path(prefix)
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found: {strip_suffix(prefix)} is not a preference dataset; "
                          "make one with `mllama-preprocess --preference`")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{where}: {path} is not valid JSON: preprocess the data again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{where}: {path} is not an {FORMAT} manifest: preprocess the data again")
    return info
