"""``mllama-tokenizer extend`` for both kinds: new ids are appended, every old id keeps its string,
the specials stay, and a text's new encoding only joins runs of its old tokens (every boundary of
the new encoding is one of the old); refusals are one line, status 2, nothing written.
Real SentencePiece / tokenizers, tiny vocabularies."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_llama.data.tokenizer import load_tokenizer
from megatron_llama.data.tokenizer_cli import main as tokenizer_main
from megatron_llama.data.tokenizer_hf import train_bpe_bytelevel
from megatron_llama.data.tokenizer_sp import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus.jsonl"
WORDS = ["東京", "の", "天気", "は", "晴れ", "です", "。", "猫", "が", "好き", "大阪", "雨", "今日", "明日", "Καλημέρα",
         "κόσμε", "καλό", "ταξίδι"]


@pytest.fixture(scope="module")
def new_corpus(tmp_path_factory) -> Path:
    """A 'new language': sentences of WORDS mixed with some English, deterministic."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("new") / "new.jsonl"
    with open(path, "w") as f:
        for _ in range(400):
            words = [WORDS[i] for i in rng.integers(0, len(WORDS), 12)]
            f.write(json.dumps({"text": "".join(words) + " the red fox " + " ".join(words[:3])}, ensure_ascii=False)
                    + "\n")
    return path


@pytest.fixture(scope="module", params=["sentencepiece", "bpe-bytelevel"])
def base(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    if request.param == "sentencepiece":
        return load_tokenizer(train_tokenizer([str(CORPUS)], str(d / "base"), 400))
    return load_tokenizer(train_bpe_bytelevel([str(CORPUS)], str(d / "base"), 600))


def _lengths(tok, ids) -> list[int]:
    """Bytes of text each token stands for (SentencePiece byte pieces are one byte)."""
    out = []
    for i in ids:
        s = tok.id_to_token(i)
        if tok.kind == "sentencepiece":
            out.append(1 if re.fullmatch(r"<0x[0-9A-F]{2}>", s) else len(s.encode()))
        else:
            out.append(len(s))  # byte-level: one character per byte
    return out


def _assert_only_joins(old, new, text: str) -> bool:
    """New encoding = old tokens with some adjacent runs joined; True if nothing was joined."""
    a, b = old.encode(text), new.encode(text)
    starts_a = dict(zip(np.cumsum([0] + _lengths(old, a))[:-1].tolist(), a))
    pos = 0
    for i, n in zip(b, _lengths(new, b)):
        assert pos in starts_a, f"token boundary at {pos} is new: {text!r}"
        if i < old.vocab_size:
            assert starts_a[pos] == i and (pos + n in starts_a or pos + n == sum(_lengths(old, a)))
        pos += n
    assert new.decode(b) == text
    return a == b


def _extend(base, out: Path, *argv) -> tuple[int, str, str]:
    import contextlib
    import io
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = tokenizer_main(["extend", base.path, "--output", str(out), *argv])
    return rc, o.getvalue(), e.getvalue()


def _written(base, out: Path) -> Path:
    return Path(f"{out}.model") if base.kind == "sentencepiece" else out / "tokenizer.json"


def test_extend_from_a_corpus_appends_ids_and_keeps_old_ones(base, new_corpus, tmp_path):
    target = base.vocab_size + 80
    rc, out, err = _extend(base, tmp_path / "ext", "--input", str(new_corpus), "--vocab-size", str(target))
    assert rc == 0, err
    new = load_tokenizer(_written(base, tmp_path / "ext"))
    assert new.kind == base.kind and new.vocab_size == target
    assert f"added 80 tokens" in out and f"model.vocab_size must become >= {target}" in out
    assert all(new.id_to_token(i) == base.id_to_token(i) for i in range(base.vocab_size))
    assert (new.bos_id, new.eos_id, new.pad_id, new.unk_id) == (base.bos_id, base.eos_id, base.pad_id, base.unk_id)
    with open(CORPUS) as f:
        old_texts = [json.loads(line)["text"] for _, line in zip(range(150), f)]
    unchanged = [_assert_only_joins(base, new, t) for t in old_texts]
    assert sum(unchanged) >= 0.5 * len(unchanged)  # the English corpus mostly does not meet the new tokens
    new_texts = [json.loads(line)["text"] for line in open(new_corpus)][:50]
    for t in new_texts:
        _assert_only_joins(base, new, t)
    assert sum(map(len, new.encode_batch(new_texts))) < 0.8 * sum(map(len, base.encode_batch(new_texts)))


def test_merge_a_second_tokenizer(base, new_corpus, tmp_path):
    if base.kind == "sentencepiece":
        other = load_tokenizer(train_tokenizer([str(new_corpus)], str(tmp_path / "other"), 360))
    else:
        other = load_tokenizer(train_bpe_bytelevel([str(new_corpus)], str(tmp_path / "other"), 400))
    rc, out, err = _extend(base, tmp_path / "m", "--merge", other.path)
    assert rc == 0, err
    new = load_tokenizer(_written(base, tmp_path / "m"))
    assert all(new.id_to_token(i) == base.id_to_token(i) for i in range(base.vocab_size))
    assert f"vocab {base.vocab_size:,} -> {new.vocab_size:,}" in out and new.vocab_size > base.vocab_size
    text = json.loads(open(new_corpus).readline())["text"]
    _assert_only_joins(base, new, text)
    assert len(new.encode(text)) < len(base.encode(text))


def test_refusals_are_one_line_status_2_nothing_written(base, new_corpus, tmp_path):
    other_kind = (train_bpe_bytelevel([str(new_corpus)], str(tmp_path / "o"), 400) if base.kind == "sentencepiece"
                  else train_tokenizer([str(new_corpus)], str(tmp_path / "o"), 360))
    cases = {"would drop existing ids": ["--input", str(new_corpus), "--vocab-size", str(base.vocab_size - 10)],
             "not above the base": ["--merge", other_kind, "--vocab-size", str(base.vocab_size)],
             "cannot merge": ["--merge", other_kind]}
    if base.kind != "sentencepiece":  # a tokenizer.json that splits text another way
        layout = json.loads(Path(base.path).read_text())
        layout["pre_tokenizer"] = {"type": "Whitespace"}
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "tokenizer.json").write_text(json.dumps(layout))
        (tmp_path / "ws" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
        cases["splits text differently"] = ["--merge", str(tmp_path / "ws")]
    cases["has no piece|has no token"] = ["--merge", base.path]  # adds nothing
    for words, argv in cases.items():
        out = tmp_path / "out" / "ext"
        rc, _, err = _extend(base, out, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (words, err)
        assert re.search(words, lines[0]), (words, lines[0])
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*")), words
