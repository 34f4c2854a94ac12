"""Tokenizer: LLaMA settings, round trips, CLI. Real SentencePiece, tiny vocabulary."""
import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from megatron_llama.config import ConfigError
from megatron_llama.data import Tokenizer, train_tokenizer
from megatron_llama.data.tokenizer_cli import main as tokenizer_main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus.jsonl"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = train_tokenizer([str(CORPUS)], str(tmp_path_factory.mktemp("tok") / "t"), 512)
    return Tokenizer.load(path)


def test_llama_special_ids_and_checksum(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == 512
    assert len(tok.checksum) == 64 and tok.checksum == Tokenizer.load(tok.path).checksum


def test_digits_are_split(tok):
    pieces = tok.sp.encode("x 1234567890", out_type=str)
    assert [p for p in pieces if p.strip("▁").isdigit()] == list("1234567890")


@pytest.mark.parametrize("text", [
    "The red fox sees the cat.", "ünïcödé Ωμέγα русский 中文字 日本語 한국어",
    "12 + 7 = 19; 3.14159 and 1,000,000", "emoji 🙂🚀👩‍👩‍👧 ✓", "   leading", "trailing   ",
    "runs    of\t\ttabs\n\n\nand newlines \r\n", " ", "a", "\x00\x01 control \x7f",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds neither


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_never_unk(tok):
    assert tok.unk_id not in tok.encode("𝔘𝔫𝔨𝔫𝔬𝔴𝔫 ∰ ☃ 🀄")


def test_train_from_txt_and_gz(tmp_path):
    import gzip
    (tmp_path / "a.txt").write_text("hello world 42\n" * 200 + "second line\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for i in range(200):
            f.write(json.dumps({"body": f"doc {i} body"}) + "\n")
    path = train_tokenizer([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")],
                           str(tmp_path / "m"), 300, text_key="body")
    assert Tokenizer.load(path).vocab_size == 300


def test_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="smaller than required_chars|vocab_size=50"):
        train_tokenizer([str(CORPUS)], str(tmp_path / "small"), 50)
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    (tmp_path / "empty.jsonl").write_text('{"other": "x"}\n')
    with pytest.raises(ConfigError, match="no text found"):
        train_tokenizer([str(tmp_path / "empty.jsonl")], str(tmp_path / "e"), 300)
    assert not list(tmp_path.glob("small*")) and not list(tmp_path.glob(".sp-train-*"))


def test_cli_info_and_errors(tok, capsys):
    assert tokenizer_main(["info", tok.path, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["vocab_size"] == 512 and facts["eos_id"] == 2 and facts["sha256"] == tok.checksum
    assert tokenizer_main(["info", "/nonexistent.model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "cli"
    assert tokenizer_main(["train", "--input", str(CORPUS), "--vocab-size", "400",
                           "--max-sentences", "20000", "--output", str(out)]) == 0
    assert Tokenizer.load(f"{out}.model").vocab_size == 400
    with pytest.raises(SystemExit):
        tokenizer_main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_training_the_same_corpus_twice_gives_the_same_file(tok, tmp_path):
    """The model file used to embed the temporary training path: every training changed the
    checksum and so invalidated preprocessed-data caches for nothing."""
    again = Tokenizer.load(train_tokenizer([str(CORPUS)], str(tmp_path / "elsewhere" / "t"), 512))
    assert again.checksum == tok.checksum
    assert Path(again.path).read_bytes() == Path(tok.path).read_bytes()
