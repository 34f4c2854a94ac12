"""The ``tiktoken`` kind: Meta's original Llama 3 ``tokenizer.model``, as a ``tokenizers`` BPE.

The file is one ``<base64 token bytes> <rank>`` line per token (128,000 for Llama 3), ranks
0..n-1; the special tokens are not in it: Meta's code appends 256 of them after the last rank
(``LLAMA3_SPECIALS``, the Llama 3 list; Llama 3.1+ renamed some reserved ones: pass
``LLAMA31_SPECIALS``). The pre-tokenizer regex is Meta's too (``tokenizer_hf.LLAMA3_PATTERN``).

tiktoken merges, inside each pre-tokenized piece, the adjacent pair whose concatenation has the
lowest rank, and takes a piece that is itself a token whole. The equivalent ``tokenizers`` BPE:
vocabulary = the tokens in the GPT-2 byte-to-unicode alphabet, id = rank; merges = every split
of a token into two tokens, ordered by the rank of the result (so the pair merged first is the
one tiktoken merges first); ``ignore_merges`` for whole tokens. A test checks the ids against
``tiktoken`` itself.

Use: ``load_tiktoken(path)`` -> an ``HFTokenizer`` (preprocessing, templates, checks);
``tiktoken_to_tokenizer_json(path, out_dir)`` writes ``tokenizer.json`` +
``tokenizer_config.json`` (Meta -> HF export); ``read_tiktoken_ranks(path)`` -> {bytes: rank}
for ``tiktoken.Encoding(mergeable_ranks=...)``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from ..config.errors import ConfigError

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)))
LLAMA31_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)))
assert len(LLAMA3_SPECIALS) == len(LLAMA31_SPECIALS) == 256

_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def looks_like_tiktoken(head: bytes) -> bool:
    """Whether the first bytes of a file are tiktoken lines (a SentencePiece proto never is)."""
    lines = head.split(b"\n")
    lines = lines[:-1] if len(lines) > 1 else lines  # the last may be cut by the read
    return bool(lines) and all(_LINE.fullmatch(line.rstrip(b"\r")) for line in lines if line)


def read_tiktoken_ranks(path: Union[str, Path]) -> dict[bytes, int]:
    """{token bytes: rank}; ConfigError unless every line is ``base64 rank`` and ranks are 0..n-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2 or not _LINE.fullmatch(line):
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise ConfigError(f"tokenizer {path}:{number} is not a tiktoken line (<base64 token> <rank>): "
                                  "pass Meta's Llama 3 tokenizer.model unchanged") from None
            if token in ranks:
                raise ConfigError(f"tokenizer {path}:{number}: token {token!r} appears twice: not a tiktoken file")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"tokenizer {path}: ranks are not 0..{len(ranks) - 1} each once: not a tiktoken "
                          "BPE file (pass Meta's Llama 3 tokenizer.model unchanged)")
    if len(ranks) < 256 or not all(bytes([b]) in ranks for b in range(256)):
        raise ConfigError(f"tokenizer {path}: not every single byte is a token: a byte-level BPE needs all 256")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (``tokenizers``' ByteLevel alphabet):
    printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def ranks_to_tokenizer(ranks: dict[bytes, int], specials: Sequence[str] = LLAMA3_SPECIALS):
    """The equivalent ``tokenizers.Tokenizer`` (see the module docstring); specials get ids
    ``len(ranks)``, ``len(ranks) + 1``, ... in order."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, models
    from .tokenizer_hf import bytelevel_layout
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    tk = RustTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True))
    bytelevel_layout(tk)
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    clash = [s for i, s in enumerate(specials) if tk.token_to_id(s) != len(ranks) + i]
    if clash:
        raise ConfigError(f"special token {clash[0]!r} is also a regular token of the tiktoken file: pass "
                          "Meta's Llama 3 tokenizer.model unchanged")
    if specials:
        bytelevel_layout(tk, bos=specials[0])
    return tk


def load_tiktoken(path: Union[str, Path], specials: Sequence[str] = LLAMA3_SPECIALS,
                  eos_token: str = "<|end_of_text|>"):
    """Meta's Llama 3 tokenizer.model as an ``HFTokenizer`` (kind ``tiktoken``): bos
    ``<|begin_of_text|>``, eos ``eos_token`` (the base models' ``<|end_of_text|>``; an Instruct
    model's turns end in ``<|eot_id|>``, which the llama3 chat template adds itself). The
    checksum is the file's sha256 (with the specials' names)."""
    from .tokenizer_hf import HFTokenizer
    ranks = read_tiktoken_ranks(path)
    tk = ranks_to_tokenizer(ranks, specials)
    h = hashlib.sha256(Path(path).read_bytes())
    h.update("\n".join(specials).encode())
    tok = HFTokenizer(tk.to_str(pretty=True), {"bos_token": specials[0], "eos_token": eos_token}, str(path),
                      checksum=h.hexdigest())
    tok.kind = "tiktoken"
    return tok


def tiktoken_to_tokenizer_json(path: Union[str, Path], out_dir: Union[str, Path],
                               specials: Sequence[str] = LLAMA3_SPECIALS, eos_token: str = "<|end_of_text|>",
                               model_max_length: Optional[int] = None, extra: Optional[dict] = None) -> list[str]:
    """Write ``out_dir/tokenizer.json`` + ``tokenizer_config.json`` equivalent to Meta's file;
    ``extra``: further tokenizer_config.json entries (a ``chat_template``). Returns the names written."""
    return load_tiktoken(path, specials, eos_token).write_hf(out_dir, model_max_length, extra)
