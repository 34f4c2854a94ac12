"""The ``sentencepiece`` kind: a BPE trained with LLaMA's settings, or a user's ``tokenizer.model``.

LLaMA's trainer spec (read back from Meta's tokenizer.model): BPE, digits split into single
pieces, byte fallback (no text is ever <unk>: unknown UTF-8 becomes <0xNN> byte pieces),
identity normalisation and no whitespace folding (so code and whitespace runs round-trip),
unk=0, bos=1, eos=2, no pad piece (pad_id=-1).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import sentencepiece as spm

from ..config.errors import ConfigError
from ..config.paths import output_prefix
from .jsonl import iter_texts
from .tokenizer import Tokenizer, check_training_files

LLAMA_TRAINER_SPEC = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,
    max_sentencepiece_length=16,
    max_sentence_length=4192,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    shuffle_input_sentence=True,
)


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model. ``encode`` adds neither BOS nor EOS: the caller decides;
    control pieces (``<s>``, ``</s>``) never come out of text."""

    kind = "sentencepiece"

    def __init__(self, path: Union[str, Path]):
        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"tokenizer {p} does not exist: train one with `mllama-tokenizer train` "
                              "or point data.tokenizer at a LLaMA tokenizer.model")
        blob = p.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(blob)
        except Exception:  # sentencepiece raises a bare RuntimeError/OSError on a bad proto
            raise ConfigError(f"tokenizer {p} is not a SentencePiece model, a tokenizer.json or a tiktoken "
                              "file: pass a tokenizer.model or a Hugging Face tokenizer.json") from None
        self.checksum = hashlib.sha256(blob).hexdigest()
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()
        if self.eos_id < 0:
            raise ConfigError(f"tokenizer {p} has no EOS piece: documents could not be separated; "
                              "train one with `mllama-tokenizer train`")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One call into C++ for many documents: far less Python overhead per document."""
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)  # unknown pieces map to unk_id: tell them apart
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def _lines(texts: Iterator[str], limit: int) -> Iterator[str]:
    """Documents -> non-empty lines (SentencePiece trains on sentences; newlines stay bytes)."""
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    return itertools.islice(lines, limit)


MIN_VOCAB = 260


def train_tokenizer(inputs: list[str], model_prefix: str, vocab_size: int, text_key: str = "text",
                    max_sentences: int = 5_000_000, num_threads: int | None = None) -> str:
    """Train a LLaMA-style BPE model on JSONL (or .txt) files; returns ``<model_prefix>.model``.

    Only the first ``max_sentences`` lines are read (SentencePiece samples from what it is given;
    LLaMA's 32k vocabulary needs a few million sentences, not the whole corpus).
    """
    check_training_files(inputs)
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is too small: use at least {MIN_VOCAB} (the 256 "
                          "byte fallback pieces, the special pieces and some merges)")
    if max_sentences < 1:
        raise ConfigError(f"max_sentences must be >= 1, got {max_sentences}")
    output_prefix(model_prefix, "tokenizer output")
    sentences = _lines(iter_texts(list(inputs), text_key), max_sentences)
    first = next(sentences, None)
    if first is None:
        raise ConfigError(f"no text found in {', '.join(map(str, inputs))} under key {text_key!r}: "
                          "check --text-key")
    out = Path(model_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Train under a temporary prefix and rename: a killed run never leaves a plausible .model.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sp-train-") as tmp:
        tmp_prefix = os.path.join(tmp, "m")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], sentences), model_prefix=tmp_prefix,
                vocab_size=vocab_size, input_sentence_size=max_sentences,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **LLAMA_TRAINER_SPEC)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            raise ConfigError(f"tokenizer training failed with vocab_size={vocab_size}: {msg}") from None
        _make_deterministic(f"{tmp_prefix}.model", out.name)
        os.replace(f"{tmp_prefix}.vocab", f"{out}.vocab")
        os.replace(f"{tmp_prefix}.model", f"{out}.model")
    return f"{out}.model"


def _make_deterministic(model_file: str, name: str) -> None:
    """SentencePiece stores its training options in the model, among them the (temporary) output
    prefix and the thread count: the same corpus would give a different file, and so a different
    checksum, every time (invalidating preprocessed-data caches keyed on it). Keep only what does
    not depend on where or on how many cores it was trained."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = name
    proto.trainer_spec.ClearField("num_threads")
    with open(model_file, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
