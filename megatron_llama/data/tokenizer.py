"""One tokenizer interface over three file kinds; ``load_tokenizer(path)`` tells them apart.

* ``sentencepiece``: a SentencePiece ``tokenizer.model`` (LLaMA 1/2, Mistral v1, ours from
  ``mllama-tokenizer train``); see ``tokenizer_sp.py``.
* ``tokenizers``: a Hugging Face ``tokenizer.json`` with its ``tokenizer_config.json`` beside it,
  which names the special tokens (Llama 3's byte-level BPE, Qwen2, Mistral; ours from
  ``mllama-tokenizer train --kind bpe-bytelevel``); see ``tokenizer_hf.py``.
* ``tiktoken``: Meta's original Llama 3 ``tokenizer.model`` (one ``base64-token rank`` line per
  token, special tokens implied), read into an equivalent ``tokenizers`` BPE; see
  ``tokenizer_tiktoken.py``.

``path`` may be the file or a directory holding ``tokenizer.model`` or ``tokenizer.json``; a
directory with both (Llama 2 and Mistral repositories) means the ``tokenizer.model``, the
original that the ``tokenizer.json`` was converted from. The kind is read from the content, never from the name alone, and a file
that is none of the three is one ConfigError.

Every kind answers the same questions: ``encode`` (no BOS/EOS added: the caller decides; text
never produces special-token ids), ``encode_batch`` (one native call for many documents),
``encode_documents`` (what preprocessing stores: ids + EOS as arrays), ``decode``,
``token_to_id``/``id_to_token``, ``vocab_size`` (largest id + 1, what ``model.vocab_size`` must
cover), the special ids (-1 where the tokenizer has none), and ``checksum`` (sha256 of what
determines the ids; recorded with preprocessed data and checkpoints).
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ..config.errors import ConfigError

KINDS = ("sentencepiece", "tokenizers", "tiktoken")


class Tokenizer:
    """What preprocessing, the chat templates, the start-up checks and export use."""

    kind: str
    path: str
    checksum: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        """Any kind (see ``load_tokenizer``)."""
        return load_tokenizer(path)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_documents(self, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        """What preprocessing stores: (tokens [sum(lengths)] of ``dtype``, every document's ids
        followed by ``eos_id``; lengths [len(texts)] int32, EOS included)."""
        ids = self.encode_batch(texts) if texts else []
        for doc in ids:
            doc.append(self.eos_id)
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum())), lengths

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a vocabulary entry (a special token such as ``<|eot_id|>``), None if absent."""
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def facts(self) -> dict:
        """What ``mllama-tokenizer info`` prints."""
        return {"path": self.path, "kind": self.kind, "vocab_size": self.vocab_size, "unk_id": self.unk_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "sha256": self.checksum}

    def describe(self) -> str:
        return (f"{Path(self.path).name} ({self.kind}): vocab {self.vocab_size}, unk={self.unk_id} "
                f"bos={self.bos_id} eos={self.eos_id} pad={self.pad_id}, sha256 {self.checksum[:12]}")

    def check_fits(self, model_vocab_size: int) -> None:
        """ConfigError unless every id is a row of an embedding with ``model_vocab_size`` rows."""
        if self.vocab_size > model_vocab_size:
            raise ConfigError(f"tokenizer {self.path} has {self.vocab_size} ids but model.vocab_size is "
                              f"{model_vocab_size}: set model.vocab_size >= {self.vocab_size} (the model "
                              "pads its vocabulary, never the reverse)")


def check_training_files(inputs: list[str]) -> None:
    """Refuse an empty or missing input list before training a tokenizer of any kind."""
    if not inputs:
        raise ConfigError("no input files to train the tokenizer on: pass JSONL or .txt files")
    for path in inputs:
        if not Path(path).is_file():
            raise ConfigError(f"input {path} does not exist: pass JSONL or .txt files")


def detect_kind(path: Union[str, Path]) -> tuple[str, Path]:
    """(kind, file) of a tokenizer file or directory; ConfigError if it is none of ``KINDS``."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (p / name).is_file():
                return detect_kind(p / name)
        raise ConfigError(f"tokenizer directory {p} has neither tokenizer.json nor tokenizer.model: point "
                          "data.tokenizer at a tokenizer file or a Hugging Face model directory")
    if not p.is_file():
        raise ConfigError(f"tokenizer {p} does not exist: train one with `mllama-tokenizer train` or point "
                          "data.tokenizer at a tokenizer.model / tokenizer.json")
    with open(p, "rb") as f:
        head = f.read(4096)
    if head.lstrip()[:1] == b"{":
        return "tokenizers", p
    from .tokenizer_tiktoken import looks_like_tiktoken
    if looks_like_tiktoken(head):
        return "tiktoken", p
    return "sentencepiece", p  # its loader says so if it is not a SentencePiece proto either


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """The tokenizer at ``path`` (file or directory), whatever its kind; ConfigError if unreadable."""
    kind, file = detect_kind(path)
    if kind == "tokenizers":
        from .tokenizer_hf import HFTokenizer
        return HFTokenizer.from_file(file)
    if kind == "tiktoken":
        from .tokenizer_tiktoken import load_tiktoken
        return load_tiktoken(file)
    from .tokenizer_sp import SentencePieceTokenizer
    return SentencePieceTokenizer(file)


_SENTENCEPIECE_NAMES = ("LLAMA_TRAINER_SPEC", "MIN_VOCAB", "SentencePieceTokenizer", "train_tokenizer")


def __getattr__(name: str):
    """The SentencePiece trainer (the quickstart's default) was first defined here; resolved lazily
    so that ``tokenizer_sp`` can import the interface from this module."""
    if name in _SENTENCEPIECE_NAMES:
        from . import tokenizer_sp
        return getattr(tokenizer_sp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
