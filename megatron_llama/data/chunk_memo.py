"""Exact byte-level BPE encoding at memo speed: ids remembered per chunk of text.

A byte-level BPE spends its time in the pre-tokenizer's regex (Oniguruma, ~2 MB/s for Llama 3's
pattern), not in BPE (``tokenizers`` caches words). Text repeats at the level of words, so the
ids of each chunk of a document are remembered, and only chunks never seen go to ``tokenizers``.

Cuts (``|`` is p, the first character of the next chunk; ``_`` a space U+0020; ``P`` a
printable non-space ASCII character ``[!-~]``; ``A`` an ASCII letter or digit):
  1. ``P|_``: a space after a P character;
  2. ``_|_P``: before the last space of a run that a P character ends;
  3. ``\n|_*P``: after a newline that, past any spaces, a P character follows;
  4. ``A|c``: between an A character and an ASCII character c that is not one.
Each is a pre-token boundary of ``CHECKED_PATTERNS`` in the whole text: the token holding the
character before p ends at p. Letter, digit and contraction runs hold no space nor other ASCII
(1, 4); the punctuation alternative ends in ``[\r\n]*`` (1); whitespace tokens hold no P (1);
for 2, a space run that no newline ends is ``\s+(?!\S)``, which stops before the last space;
for 3, a newline run ends at the newline, as no newline follows before P. The patterns have no
look-behind, so matching from p sees what it sees in the whole text; and ``(?!\S)`` at p, the
end of the chunk, never answers otherwise than there: in 1 and 4 it is not asked (the
character before p is not whitespace), in 2 a space follows p, and in 3 ``\s*[\r\n]+`` takes
any whitespace run holding the newline before ``\s+(?!\S)`` is tried. BPE works on each pre-token alone, so ids(text) ==
the concatenation of ids(chunk), exactly. Tests check the cuts against ``tokenizers``'
pre-tokens and the ids against its own on corpora, adversarial strings and a fuzz (which
catches each plausible wrong rule: punctuation|letter, letter|non-ASCII, after any newline, ...).

It holds only for the layout ``fast_path_refusal`` accepts (no normaliser, that Split, a
byte-level step that adds no space, a deterministic BPE, every added token special: with
``encode_special_tokens`` those are plain text, while a non-special added token could span a
cut or strip the space after it). Any other tokenizer.json is encoded by ``tokenizers`` alone.

Memory (per worker process): the memo is emptied before a batch that would take it past
``max_entries`` chunks (default 2**20: ~140 MB of keys and id bytes; the benchmark measured 124 MB
for 920k chunks of Python code).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# Llama 3 (== GPT-4's cl100k as Hugging Face files write it) and Qwen2 (single digits).
CHECKED_PATTERNS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_SEP, _CUT = 0xFE, 0xFF  # bytes that UTF-8 never contains: a document's end, a cut
MAX_ENTRIES = 1 << 20


def fast_path_refusal(spec: dict) -> Optional[str]:
    """None if the parsed tokenizer.json ``spec`` is a layout the chunk cut is exact for, else why not."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if not steps or len(steps) != 2:
        return "its pre-tokenizer is not Split + ByteLevel"
    split, byte_level = steps
    if not (split.get("type") == "Split" and split.get("pattern") in [{"Regex": p} for p in CHECKED_PATTERNS]
            and split.get("behavior") == "Isolated" and split.get("invert") is False):
        return "its Split is not a checked pattern (isolated, not inverted)"
    if not (byte_level.get("type") == "ByteLevel" and byte_level.get("add_prefix_space") is False
            and byte_level.get("use_regex") is False):
        return "its ByteLevel step adds a prefix space or splits again"
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return "its model is not a BPE without dropout"
    if any(not t.get("special") for t in spec.get("added_tokens") or []):
        return "it has non-special added tokens"
    return None


def cut_points(buf: np.ndarray) -> np.ndarray:
    """Positions p (0 < p < len) to cut ``buf`` [n] uint8 (UTF-8 documents, each followed by
    _SEP) before, sorted: the rules of the module docstring, and around every _SEP."""
    printable = (buf >= 0x21) & (buf <= 0x7E)
    space = buf == 0x20
    cut = np.zeros(len(buf), bool)
    cut[1:] = space[1:] & printable[:-1]                        # 1. "x| y"
    cut[1:-1] |= space[:-2] & space[1:-1] & printable[2:]       # 2. "   | x"
    # 3. "\n|   x" and "\n|x": the first non-space byte from p on is printable
    pos = np.arange(len(buf))
    next_solid = np.minimum.accumulate(np.where(space, len(buf) - 1, pos)[::-1])[::-1]
    cut[1:] |= (buf[:-1] == 0x0A) & printable[next_solid[1:]]
    alnum = ((buf | 0x20) >= 0x61) & ((buf | 0x20) <= 0x7A) | (buf >= 0x30) & (buf <= 0x39)
    cut[1:] |= alnum[:-1] & (buf[1:] < 0x80) & ~alnum[1:]         # 4. "x|." "7|\n"
    sep = np.flatnonzero(buf == _SEP)
    cut[sep] = True
    cut[sep[sep + 1 < len(buf)] + 1] = True
    cut[0] = False
    return np.flatnonzero(cut)


class ChunkMemo:
    """``encode_documents`` over a ``tokenizers.Tokenizer`` whose layout passed
    ``fast_path_refusal`` and whose ``encode_special_tokens`` is on; ``eos_id`` ends documents."""

    def __init__(self, tk, eos_id: int, max_entries: int = MAX_ENTRIES):
        self.tk, self.max_entries = tk, max_entries
        self.eos_id, self.eos = eos_id, np.uint32(eos_id).tobytes()
        self.memo: dict[bytes, bytes] = {bytes([_SEP]): self.eos}  # chunk UTF-8 -> ids, uint32 bytes
        self.total_bytes = self.miss_bytes = 0  # UTF-8 bytes seen / sent to tokenizers (hit_rate)

    def encode_documents(self, texts: list[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(tokens [sum(lengths)] uint32: each document's ids then EOS; lengths [len(texts)]
        int32), the ids equal to ``tk.encode(text, add_special_tokens=False).ids``; None for
        text that is not UTF-8 (a lone surrogate): encode it without the memo."""
        try:
            buf = (b"\xfe".join(t.encode() for t in texts) + b"\xfe")
        except UnicodeEncodeError:
            return None
        raw = np.frombuffer(buf, np.uint8)
        pieces = np.insert(raw, cut_points(raw), _CUT).tobytes().split(b"\xff")
        ids = list(map(self.memo.get, pieces))
        if None in ids:
            self._learn(pieces)
            ids = list(map(self.memo.__getitem__, pieces))
        tokens = np.frombuffer(b"".join(ids), np.uint32)
        self.total_bytes += len(buf) - len(texts)
        ends = np.flatnonzero(tokens == self.eos_id) + 1
        if len(ends) != len(texts):  # text made the EOS id too (an EOS that is a word): count
            seps = [k for k, p in enumerate(pieces) if p == b"\xfe"]
            ends = np.cumsum(np.fromiter(map(len, ids), np.int64, len(ids)))[seps] // 4
        return tokens, np.diff(ends, prepend=0).astype(np.int32)

    def _learn(self, pieces: list[bytes]) -> None:
        """Encode the pieces not in the memo (one batch call into ``tokenizers``) and keep them."""
        distinct = set(pieces)
        if len(self.memo) + len(distinct) > self.max_entries:
            self.memo = {bytes([_SEP]): self.eos}
        missing = list(distinct.difference(self.memo))
        enc = self.tk.encode_batch_fast([m.decode() for m in missing], add_special_tokens=False)
        self.memo.update(zip(missing, (np.asarray(e.ids, np.uint32).tobytes() for e in enc)))
        self.miss_bytes += sum(map(len, missing))

    def hit_rate(self) -> float:
        """Share of the UTF-8 bytes encoded so far that came from the memo."""
        return 1 - self.miss_bytes / max(self.total_bytes, 1)
