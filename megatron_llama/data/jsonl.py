"""Reading a user's corpus: JSONL files, plain, gzip or zstd, one document per line.

Every reader in the data package goes through here, so "what counts as a bad line" is
defined once: invalid JSON, not an object, missing text field, non-string text, empty text.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from ..config.errors import ConfigError

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".txt")


def open_binary(path: Union[str, Path]) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, raw file) for ``path``; the raw file's ``tell()`` drives progress bars."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input {path} does not exist: pass a JSONL file (.jsonl, .jsonl.gz, .jsonl.zst)")
    raw = open(path, "rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise ConfigError(f"input {path} is zstd-compressed: pip install zstandard, "
                              "or decompress it with `zstd -d`") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False), raw
    return raw, raw


def lines_of(stream: BinaryIO, path: Union[str, Path]) -> Iterator[bytes]:
    """Iterate the lines of a stream from ``open_binary``."""
    # zstd's reader has no readline: buffer it; plain and gzip files already iterate by line
    return iter(io.BufferedReader(stream, 1 << 20) if Path(path).suffix == ".zst" else stream)


def iter_lines(path: Union[str, Path]) -> Iterator[bytes]:
    """Raw lines (bytes, newline included) of a possibly compressed file."""
    stream, raw = open_binary(path)
    with raw, stream:
        yield from lines_of(stream, path)


def parse_object(line: bytes) -> tuple[Optional[dict], Optional[str]]:
    """(object, None) for a line holding a JSON object, (None, reason) for any other line,
    (None, None) for a blank one. Shared by the pretraining and SFT record parsers."""
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:  # e.msg alone is cut off ("Invalid control character at")
        where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno} of the record"
        return None, f"invalid JSON ({e.msg.removesuffix(' at')} at {where})"
    except UnicodeDecodeError as e:
        return None, f"invalid JSON (not UTF-8 at byte {e.start + 1})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    return obj, None


def parse_line(line: bytes, text_key: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a good line, (None, reason) for a bad one; blank lines are (None, None)."""
    obj, reason = parse_object(line)
    if obj is None:
        return None, reason
    if text_key not in obj:
        keys = ", ".join(list(obj)[:5])
        return None, f"no {text_key!r} field (keys: {keys}); choose the field with --text-key"
    text = obj[text_key]
    if not isinstance(text, str):
        return None, f"field {text_key!r} is {type(text).__name__}, not a string"
    if not text:
        return None, f"field {text_key!r} is empty"
    try:  # JSON may escape a lone UTF-16 surrogate, which no tokenizer can encode
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"field {text_key!r} holds an unpaired surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return text, None


def iter_texts(paths: list[Union[str, Path]], text_key: str = "text") -> Iterator[str]:
    """Every good document text of ``paths``, bad lines silently skipped (tokenizer training)."""
    for path in paths:
        if str(path).endswith(".txt"):  # plain text for tokenizer training: every line is text
            for line in iter_lines(path):
                if line.strip():
                    yield line.decode("utf-8", errors="replace").rstrip("\n")
            continue
        for line in iter_lines(path):
            text, _ = parse_line(line, text_key)
            if text is not None:
                yield text
