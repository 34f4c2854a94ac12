"""``mllama-tokenizer extend``: append tokens to a BPE tokenizer, never changing an existing id.

Swallow's recipe for continual pretraining on a new language: learn the new language's tokens
and append them to the model's tokenizer, so the old rows of the embedding keep their meaning.
Two sources of new tokens, for both kinds (SentencePiece BPE and ``tokenizers`` BPE, Meta's
tiktoken file included):

* ``--input FILES --vocab-size N``: a BPE of the same kind and layout is trained on the new corpus
  (with N ids), and its tokens that the base lacks are appended until the base has N ids;
* ``--merge OTHER``: OTHER's tokens that the base lacks are appended (all, or until N ids).

What is appended, in order: new single characters first, then new merged tokens in the order
their own tokenizer learned them (so every merge's parts exist before it). They rank below every
existing merge (SentencePiece: scores below the lowest; ``tokenizers``: merges after the last),
so BPE first makes exactly the merges it made before and only then the new ones. What this
changes, exactly: ids 0..V-1 keep their strings and every special id stays; a text encodes to
its old tokens with some runs of adjacent old tokens joined into new tokens (every boundary of
the new encoding is a boundary of the old one; a test checks it), and texts in which no new
token applies encode as before.

Refused in one line, nothing written: a base or OTHER that is not BPE, OTHER of another kind or
that splits text differently (its tokens would never apply), a target size that would drop ids,
an extension that adds nothing, and, checked on the result before writing, any old id whose
string or any special id that would change.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config.errors import ConfigError
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class Extension:
    output: str          # the file written (a .model, or DIR/tokenizer.json)
    old_vocab: int
    new_vocab: int

    def describe(self) -> str:
        added = self.new_vocab - self.old_vocab
        return (f"wrote {self.output}: added {added:,} tokens (ids {self.old_vocab:,}..{self.new_vocab - 1:,}); "
                f"vocab {self.old_vocab:,} -> {self.new_vocab:,}. Existing ids are unchanged.\n"
                f"model.vocab_size must become >= {self.new_vocab:,} (a model trained with the old tokenizer "
                f"covers {self.old_vocab:,}); continue it with train.init_from so its old rows are kept and the "
                f"{added:,} new rows are initialised")


def extend_tokenizer(base: str, output: str, inputs: Optional[list[str]] = None, merge: Optional[str] = None,
                     vocab_size: Optional[int] = None, text_key: str = "text",
                     max_sentences: int = 5_000_000) -> Extension:
    """Extend ``base`` (see the module docstring); ConfigError (nothing written) if it cannot."""
    if (inputs is None) == (merge is None):
        raise ConfigError("extend needs exactly one source of new tokens: --input FILE... --vocab-size N "
                          "(learn them from a corpus) or --merge TOKENIZER")
    old = load_tokenizer(base)
    if old.kind == "sentencepiece":
        _check_sp_bpe(old, "the base tokenizer")
    if vocab_size is not None and vocab_size <= old.vocab_size:
        raise ConfigError(f"--vocab-size {vocab_size} is not above the base's {old.vocab_size} ids: reaching it "
                          f"would drop existing ids, which extend never does; pass a size > {old.vocab_size}")
    if inputs is not None and vocab_size is None:
        raise ConfigError("--input needs --vocab-size N: the extended tokenizer's size (> the base's "
                          f"{old.vocab_size} ids)")
    _check_output(Path(f"{output}.model") if old.kind == "sentencepiece" else Path(output) / "tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="mllama-extend-") as tmp:
        if merge is not None:
            other = load_tokenizer(merge)
        else:
            other = _train_like(old, inputs, Path(tmp), vocab_size, text_key, max_sentences)
        if old.kind == "sentencepiece":
            return _extend_sp(old, other, output, vocab_size)
        return _extend_hf(old, other, output, vocab_size)


def _check_output(file: Path) -> None:
    """``file`` can be written later, checked without creating anything (a refusal writes nothing)."""
    if file.is_dir():
        raise ConfigError(f"--output: {file} is a directory: choose another --output")
    for p in file.parents:
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"--output: {p} is a file, not a directory: choose another location")
            if not os.access(p, os.W_OK):
                raise ConfigError(f"--output: {p} is not writable: choose a directory you can write to")
            return


# --- SentencePiece -------------------------------------------------------------------------

def _proto(tok):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tok.path).read_bytes())
    return proto


def _check_sp_bpe(tok, what: str) -> None:
    if _proto(tok).trainer_spec.model_type != 2:  # TrainerSpec.BPE
        raise ConfigError(f"{what} {tok.path} is a SentencePiece unigram model, not BPE: extend appends BPE "
                          "merges, which a unigram model does not have")


def _extend_sp(old, other, output: str, vocab_size: Optional[int]) -> Extension:
    if other.kind != "sentencepiece":
        raise ConfigError(f"cannot merge {other.path} ({other.kind}) into the SentencePiece model {old.path}: "
                          "merge a SentencePiece BPE, or learn tokens with --input")
    _check_sp_bpe(other, "the tokenizer to merge")
    base, extra = _proto(old), _proto(other)
    fields = ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces")
    if any(getattr(base.normalizer_spec, f) != getattr(extra.normalizer_spec, f) for f in fields) \
            or base.trainer_spec.byte_fallback != extra.trainer_spec.byte_fallback:
        raise ConfigError(f"{other.path} normalises text differently from {old.path} (normalizer or byte "
                          "fallback): its pieces would not apply; learn tokens with --input instead")
    have = {p.piece for p in base.pieces}
    normal, user = 1, 4  # ModelProto.SentencePiece.Type
    candidates = [p for p in extra.pieces if p.type in (normal, user) and p.piece not in have]
    # single characters first (they need no merge), then merged pieces in their learned order
    candidates.sort(key=lambda p: len(p.piece) > 1)
    room = len(candidates) if vocab_size is None else vocab_size - len(base.pieces)
    lowest = min((p.score for p in base.pieces if p.type == normal), default=0.0)
    for k, p in enumerate(candidates[:room]):
        new = base.pieces.add()
        new.piece, new.type = p.piece, p.type
        new.score = lowest - 1.0 - k  # below every existing piece, in order: merged after them
    added = len(base.pieces) - old.vocab_size
    if added == 0:
        raise ConfigError(f"{other.path} has no piece that {old.path} lacks: nothing to add")
    base.trainer_spec.vocab_size = len(base.pieces)
    out = Path(f"{output}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(base.SerializeToString(deterministic=True))
        _check_unchanged(old, load_tokenizer(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Extension(str(out), old.vocab_size, old.vocab_size + added)


# --- tokenizers (tokenizer.json; Meta's tiktoken file converted) ---------------------------

def _bpe_model(tok) -> dict:
    model = json.loads(tok.tokenizer_json)["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"{tok.path} is a {model.get('type')} tokenizer, not BPE: extend appends BPE merges")
    return model


def _pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json writes merges as ["a", "b"] pairs (0.20+) or "a b" strings (older)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _extend_hf(old, other, output: str, vocab_size: Optional[int]) -> Extension:
    from .tokenizer_hf import HFTokenizer
    if other.kind not in ("tokenizers", "tiktoken"):
        raise ConfigError(f"cannot merge {other.path} ({other.kind}) into the tokenizer.json {old.path}: "
                          "merge a tokenizer.json BPE, or learn tokens with --input")
    base, extra = json.loads(old.tokenizer_json), json.loads(other.tokenizer_json)
    for part in ("normalizer", "pre_tokenizer"):
        if base.get(part) != extra.get(part):
            raise ConfigError(f"{other.path} splits text differently from {old.path} (its {part} differs): its "
                              "tokens would not apply; learn tokens with --input instead")
    model, extra_model = _bpe_model(old), _bpe_model(other)
    if model.get("byte_fallback") != extra_model.get("byte_fallback"):
        raise ConfigError(f"{other.path} and {old.path} differ in byte_fallback: its tokens would not apply")
    vocab = model["vocab"]
    taken = set(vocab) | {t["content"] for t in base.get("added_tokens", [])}
    produced = {a + b for a, b in _pairs(extra_model["merges"])}
    merges = [list(p) for p in _pairs(model["merges"])]
    next_id = old.vocab_size
    limit = vocab_size if vocab_size is not None else float("inf")
    by_id = sorted(extra_model["vocab"].items(), key=lambda kv: kv[1])
    for token, _ in by_id:  # characters of OTHER's alphabet first: they need no merge
        if token not in taken and token not in produced and next_id < limit:
            vocab[token], next_id = next_id, next_id + 1
            taken.add(token)
    for a, b in _pairs(extra_model["merges"]):  # then merged tokens in the order OTHER learned them
        if a + b not in taken and a in vocab and b in vocab and next_id < limit:
            vocab[a + b], next_id = next_id, next_id + 1
            taken.add(a + b)
            merges.append([a, b])
    for t in extra.get("added_tokens", []):
        if t["content"] not in taken and next_id < limit:
            base.setdefault("added_tokens", []).append({**t, "id": next_id})
            next_id += 1
            taken.add(t["content"])
    if next_id == old.vocab_size:
        raise ConfigError(f"{other.path} has no token that {old.path} lacks: nothing to add")
    model["merges"] = merges
    base["model"] = model
    new = HFTokenizer(json.dumps(base, ensure_ascii=False, indent=2), old.special, str(Path(output) / "tokenizer.json"),
                      old.config)
    _check_unchanged(old, new)
    new.write_hf(output)
    return Extension(new.path, old.vocab_size, new.vocab_size)


# --- shared ---------------------------------------------------------------------------------

def _train_like(old, inputs: list[str], tmp: Path, vocab_size: int, text_key: str, max_sentences: int):
    """A BPE with ``vocab_size`` ids trained on ``inputs`` that splits text as ``old`` does."""
    if old.kind == "sentencepiece":
        from .tokenizer_sp import train_tokenizer
        return load_tokenizer(train_tokenizer(inputs, str(tmp / "new"), vocab_size, text_key,
                                              max_sentences=max_sentences))
    import itertools

    from tokenizers import Tokenizer as RustTokenizer, models, trainers

    from .jsonl import iter_texts
    from .tokenizer_hf import HFTokenizer
    for path in inputs:
        if not Path(path).is_file():
            raise ConfigError(f"input {path} does not exist: pass JSONL or .txt files")
    layout = json.loads(old.tokenizer_json)
    model = _bpe_model(old)
    tk = RustTokenizer.from_str(old.tokenizer_json)
    tk.model = models.BPE(byte_fallback=bool(model.get("byte_fallback")), ignore_merges=bool(model.get("ignore_merges")))
    alphabet = [t for t in model["vocab"] if len(t) == 1]  # the base's single characters (the 256 bytes)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet)
    texts = list(itertools.islice(iter_texts(list(inputs), text_key), max_sentences))
    if not texts:
        raise ConfigError(f"no text found in {', '.join(map(str, inputs))} under key {text_key!r}: check --text-key")
    tk.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(tk.to_str())
    trained["added_tokens"] = []  # the base's own specials are not new tokens
    for part in ("normalizer", "pre_tokenizer"):
        trained[part] = layout.get(part)
    return HFTokenizer(json.dumps(trained), {"eos_token": None}, str(tmp / "new.json"), checksum="-",
                       require_eos=False)


def _check_unchanged(old: Tokenizer, new: Tokenizer) -> None:
    """The guarantee, checked on the result: ConfigError if any old id or special id would change."""
    for i in range(old.vocab_size):
        a, b = old.id_to_token(i), new.id_to_token(i)
        if a != b:
            raise ConfigError(f"the extension would change existing id {i} ({a!r} -> {b!r}): refused, nothing "
                              "written")
    for role in ("bos_id", "eos_id", "pad_id", "unk_id"):
        if getattr(old, role) != getattr(new, role):
            raise ConfigError(f"the extension would change {role} ({getattr(old, role)} -> {getattr(new, role)}): "
                              "refused, nothing written")
    if new.vocab_size <= old.vocab_size:
        raise ConfigError("the extension adds no id: nothing written")
