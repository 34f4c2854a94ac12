"""The ``tokenizers`` kind: a Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.

The ``tokenizers`` library does all the work (pre-tokenisation, BPE, batch encoding in Rust).
``tokenizer_config.json`` beside the file names the special tokens: ``bos_token``,
``eos_token``, ``pad_token``, ``unk_token`` (a string or an ``AddedToken`` object), as
``transformers`` reads them. An ``eos_token`` is required: documents are separated by it.

Encoding treats special-token strings in text as text (``encode_special_tokens``): a web page
that happens to contain ``<|end_of_text|>`` must not put an EOS id in the middle of a document,
as with SentencePiece, whose control pieces never come from text. The chat templates insert
special ids themselves.

``encode_documents`` (preprocessing) remembers the ids of each chunk of text where the layout
makes that exact (``chunk_memo.py``: Llama 3's and Qwen2's pre-tokenizers, no normaliser), and
is several times faster on text that repeats words; ``chunk_memo`` is None for any other layout
(``chunk_memo_refusal`` says why), and ``encode``/``encode_batch`` are ``tokenizers``' own.

``train_bpe_bytelevel`` trains Llama 3's layout (its pre-tokenizer regex, byte-level alphabet,
no normaliser, ``<|begin_of_text|>`` added by the post-processor for ``transformers``) on
JSONL/txt; the file written depends only on the corpus and the vocabulary size.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ..config.errors import ConfigError
from .chunk_memo import ChunkMemo, fast_path_refusal
from .tokenizer import Tokenizer, check_training_files

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# Llama 3's pre-tokenizer (Meta's tokenizer.py): contractions, letter runs with one leading
# non-letter, digit groups of at most three, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Special tokens of a trained byte-level BPE: Llama 3's names, so the llama3 chat template works.
TRAINED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>")


def _token_content(value) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{value!r} is neither a string nor an AddedToken object")


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with its special tokens.

    ``tokenizer_json``: the serialised tokenizer (written out again as is by ``write_hf``);
    ``special``: role -> token string (SPECIAL_ROLES); ``config``: the tokenizer_config.json
    entries it came with (export starts from them, so nothing the user had is dropped)."""

    kind = "tokenizers"

    def __init__(self, tokenizer_json: str, special: dict, path: str, config: Optional[dict] = None,
                 checksum: Optional[str] = None, require_eos: bool = True, parsed=None):
        """``parsed``: ``tokenizers.Tokenizer.from_str(tokenizer_json)`` where the caller already built
        it (about a second of CPU for a 128k vocabulary)."""
        from tokenizers import Tokenizer as RustTokenizer
        self.tokenizer_json, self.path = tokenizer_json, path
        self.tk = tk = parsed if parsed is not None else RustTokenizer.from_str(tokenizer_json)
        # a file saved after someone used truncation/padding keeps them; documents are never cut or padded here
        tk.no_truncation()
        tk.no_padding()
        self.config = dict(config or {})
        self.special = {k: v for k, v in special.items() if v is not None}
        self.checksum = checksum or tokenizer_checksum(tokenizer_json.encode("utf-8"), self.special)
        self.vocab_size = max(tk.get_vocab(with_added_tokens=True).values()) + 1
        ids = {}
        for role in SPECIAL_ROLES:
            token = self.special.get(role)
            i = -1 if token is None else tk.token_to_id(token)
            if i is None:
                raise ConfigError(f"tokenizer {path}: its {role} {token!r} is not in the vocabulary: fix "
                                  "tokenizer_config.json")
            ids[role] = i
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id, self.unk_id = ids["pad_token"], ids["unk_token"]
        if self.eos_id < 0 and require_eos:
            raise ConfigError(f"tokenizer {path} has no eos_token in tokenizer_config.json: documents could not "
                              "be separated; add \"eos_token\" there")
        tk.encode_special_tokens = True  # see the module docstring
        # why the chunk memo is off for this file (None: on); decided once, from the file
        self.chunk_memo_refusal = fast_path_refusal(json.loads(tokenizer_json)) if self.eos_id >= 0 else "no EOS"
        self.chunk_memo = ChunkMemo(tk, self.eos_id) if self.chunk_memo_refusal is None else None

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "HFTokenizer":
        """``path``: a tokenizer.json; its tokenizer_config.json is read from the same directory."""
        from tokenizers import Tokenizer as RustTokenizer
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8")
            parsed = RustTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ConfigError(f"tokenizer {p} is not a Hugging Face tokenizer.json ({why}): pass the "
                              "tokenizer.json of a Hugging Face model, or a SentencePiece tokenizer.model") from None
        conf_path = p.parent / "tokenizer_config.json"
        if not conf_path.is_file():
            raise ConfigError(f"tokenizer {p} has no tokenizer_config.json beside it: it names the special "
                              "tokens (bos_token, eos_token); copy it from the same model")
        try:
            config = json.loads(conf_path.read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
            special = {role: _token_content(config.get(role)) for role in SPECIAL_ROLES}
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{conf_path} is not a valid tokenizer_config.json ({e}): copy it from the same "
                              "model") from None
        return cls(text, special, str(p), config, parsed=parsed)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One call into Rust; ``_fast``: no character offsets, which nothing here uses."""
        return [e.ids for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_documents(self, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        """The chunk memo's ids (equal to ``encode_batch``'s), or ``encode_batch``'s without it."""
        done = self.chunk_memo.encode_documents(texts) if self.chunk_memo is not None and texts else None
        if done is None:
            return super().encode_documents(texts, dtype)
        return done[0].astype(dtype, copy=False), done[1]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def write_hf(self, out: Union[str, Path], model_max_length: Optional[int] = None,
                 extra: Optional[dict] = None) -> list[str]:
        """``out/tokenizer_config.json`` then ``out/tokenizer.json`` (each atomically), as
        ``transformers.AutoTokenizer`` loads them; ``extra``: entries to set (``chat_template``).
        Returns the file names written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                **self.config, **{role: None for role in SPECIAL_ROLES}, **self.special}
        if model_max_length is not None:
            conf["model_max_length"] = model_max_length
        conf.update(extra or {})
        _write_atomic(out / "tokenizer_config.json", json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(out / "tokenizer.json", self.tokenizer_json)
        return ["tokenizer_config.json", "tokenizer.json"]


def tokenizer_checksum(tokenizer_json: bytes, special: dict) -> str:
    """sha256 of the tokenizer.json and of the special tokens chosen in tokenizer_config.json
    (what decides the ids), not of that file's other entries (an exported chat_template)."""
    h = hashlib.sha256(tokenizer_json)
    h.update(json.dumps({k: special.get(k) for k in SPECIAL_ROLES}, sort_keys=True).encode())
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def bytelevel_layout(tk, bos: Optional[str] = None) -> None:
    """Give ``tk`` Llama 3's pipeline around its model: regex split, byte-level alphabet, byte-level
    decoder, and (``bos``) a post-processor that puts BOS first as ``transformers`` expects."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tk.token_to_id(bos))])


MIN_BPE_VOCAB = 256 + len(TRAINED_SPECIALS) + 1


def train_bpe_bytelevel(inputs: list[str], output_dir: str, vocab_size: int, text_key: str = "text",
                        max_documents: int = 5_000_000, progress: bool = False) -> str:
    """Train a byte-level BPE (Llama 3's layout) on JSONL/.txt; writes ``output_dir/tokenizer.json``
    and ``tokenizer_config.json`` (bos ``<|begin_of_text|>``, eos ``<|end_of_text|>``); returns the
    tokenizer.json path. Ids: the specials 0-4, the 256 bytes, then merges in the order learned."""
    import itertools

    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers, trainers

    from ..config.paths import output_prefix
    from .jsonl import iter_texts
    check_training_files(inputs)
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is too small for a byte-level BPE: use at least "
                          f"{MIN_BPE_VOCAB} (the 256 bytes, {len(TRAINED_SPECIALS)} special tokens and a merge)")
    if max_documents < 1:
        raise ConfigError(f"max_documents must be >= 1, got {max_documents}")
    out = Path(output_dir)
    output_prefix(str(out / "tokenizer"), "tokenizer output")
    texts = itertools.islice(iter_texts(list(inputs), text_key), max_documents)
    first = next(texts, None)
    if first is None:
        raise ConfigError(f"no text found in {', '.join(map(str, inputs))} under key {text_key!r}: "
                          "check --text-key")
    tk = RustTokenizer(models.BPE())
    bytelevel_layout(tk)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                  special_tokens=list(TRAINED_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
    bytelevel_layout(tk, bos=TRAINED_SPECIALS[0])
    special = {"bos_token": TRAINED_SPECIALS[0], "eos_token": TRAINED_SPECIALS[1]}
    HFTokenizer(tk.to_str(pretty=True), special, str(out / "tokenizer.json")).write_hf(out)
    return str(out / "tokenizer.json")
