"""Preprocessing -> Megatron .bin/.idx, read back by megatron-core's own IndexedDataset."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_llama.config import ConfigError
from megatron_llama.data import Tokenizer, train_tokenizer
from megatron_llama.data.indexed import DTYPE_CODES, inspect_indexed, token_dtype
from megatron_llama.data.preprocess import preprocess
from megatron_llama.data.preprocess_cli import main as preprocess_main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus.jsonl"
DOCS = ["Hello world 123.", "ünïcödé 🙂 and   spaces\n\nnext paragraph", "The red fox sees the cat."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.load(train_tokenizer([str(CORPUS)], str(tmp_path_factory.mktemp("tok") / "t"), 512))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    if path.suffix == ".zst":
        import zstandard
        path.write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
        return path
    with opener(path, "wt") as f:
        f.writelines(lines)
    return path


def docs_lines(docs=DOCS, key="text"):
    return [json.dumps({key: d, "meta": 1}) + "\n" for d in docs]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_megatron_reads_ours(tmp_path, tok, suffix):
    src = write_jsonl(tmp_path / f"in{suffix}", docs_lines())
    s = preprocess([str(src)], str(tmp_path / "out"), tok.path, workers=1, progress=False)
    assert (s.documents, s.skipped) == (3, 0)
    ds = IndexedDataset(str(tmp_path / "out"))  # megatron-core's reader
    assert len(ds) == 3 and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == [0, 1, 2, 3]
    for i, text in enumerate(DOCS):
        ids = ds[i]
        assert ids[-1] == tok.eos_id  # EOS appended per document
        assert ids[:-1].tolist() == tok.encode(text) and tok.decode(ids[:-1]) == text
    assert s.tokens == int(ds.sequence_lengths.sum())


def test_text_key_and_workers_give_identical_files(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [line.replace('"text"', '"content"')
                                              for line in CORPUS.read_text().splitlines(True)[:1500]])
    one = preprocess([str(src)], str(tmp_path / "one"), tok.path, "content", workers=1, progress=False)
    two = preprocess([str(src)], str(tmp_path / "two"), tok.path, "content", workers=2,
                     chunk_bytes=20_000, progress=False)
    assert one.documents == two.documents == 1500
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_ours_reads_megatron(tmp_path, tok):
    """A corpus written by megatron-core's own builder (as Megatron-LM's tools do) passes our checks."""
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for text in DOCS:
        builder.add_document(torch.tensor(tok.encode(text) + [tok.eos_id]), [len(tok.encode(text)) + 1])
    builder.finalize(str(tmp_path / "theirs.idx"))
    info = inspect_indexed(str(tmp_path / "theirs"))
    assert info.num_documents == 3 and info.dtype == np.uint16
    assert info.num_tokens == sum(len(tok.encode(t)) + 1 for t in DOCS)


def test_dtype_table_matches_megatron():
    for code, dtype in DTYPE_CODES.items():
        assert DType.dtype_from_code(code) == dtype
    for vocab in (512, 32000, 65499, 65500, 152064):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)


BAD = ['{"text": "good one"}\n', "not json\n", '{"txt": "x"}\n', "\n", '{"text": 5}\n',
       '{"text": ""}\n', "[1, 2]\n", '{"text": "good two"}\n', '{"text": null}\n']


def test_bad_lines_skipped_and_reported(tmp_path, tok):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    s = preprocess([str(src)], str(tmp_path / "out"), tok.path, workers=1, progress=False)
    assert (s.documents, s.skipped) == (2, 6)
    assert [n for _, n, _ in s.bad_examples] == [2, 3, 5, 6, 7]  # first five, 1-based
    text = s.describe()
    assert "invalid JSON" in text and "no 'text' field" in text and "is int" in text
    assert "is empty" in text and "and 1 more" in text


def test_invalid_json_says_what_and_where():
    from megatron_llama.data.jsonl import parse_line
    cases = {b'{"text": "a\tb"}': "invalid JSON (Invalid control character at column 12)",
             b"not json": "invalid JSON (Expecting value at column 1)",
             b'{"text": "abc': "invalid JSON (Unterminated string starting at column 10)",
             b'{"text": "x"} y': "invalid JSON (Extra data at column 15)",
             b'{"text": "\xff"}': "invalid JSON (not UTF-8 at byte 11)",
             b'{"text": "ab\\ud800"}': "field 'text' holds an unpaired surrogate \\ud800 at character 2"}
    for line, reason in cases.items():
        assert parse_line(line, "text") == (None, reason), line


def test_invalid_json_in_a_corpus_names_file_line_and_column(tmp_path, tok):
    src = write_jsonl(tmp_path / "tab.jsonl", ['{"text": "fine"}\n', '{"text": "raw\ttab"}\n'])
    s = preprocess([str(src)], str(tmp_path / "out"), tok.path, workers=1, progress=False)
    assert f"{src}:2: invalid JSON (Invalid control character at column 14)" in s.describe()


def test_strict_stops_and_writes_nothing(tmp_path, tok):
    good = CORPUS.read_text().splitlines(True)[:800]
    src = write_jsonl(tmp_path / "in.jsonl", good + ['{"text": 1}\n'] + good)
    (tmp_path / "out.idx").write_bytes(b"old")  # an older output must survive a failed run
    with pytest.raises(ConfigError, match=r"in.jsonl:801: field 'text' is int.*--strict"):
        preprocess([str(src)], str(tmp_path / "out"), tok.path, workers=2, strict=True,
                   chunk_bytes=10_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.idx"]
    assert (tmp_path / "out.idx").read_bytes() == b"old"


def test_empty_corpus_and_missing_input(tmp_path, tok):
    src = write_jsonl(tmp_path / "empty.jsonl", ['{"x": 1}\n', "\n"])
    with pytest.raises(ConfigError, match="no documents"):
        preprocess([str(src)], str(tmp_path / "out"), tok.path, workers=1, progress=False)
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(ConfigError, match="does not exist"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "out"), tok.path, progress=False)


def test_cli(tmp_path, tok, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", BAD)
    assert preprocess_main(["--input", str(src), "--tokenizer", tok.path, "--output",
                            str(tmp_path / "o"), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "6 skipped" in out
    assert preprocess_main(["--input", str(src), "--tokenizer", tok.path, "--output",
                            str(tmp_path / "s"), "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and ":2:" in err
    with pytest.raises(SystemExit):
        preprocess_main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_killed_run_leaves_nothing_that_looks_finished(tmp_path, tok):
    import signal
    import subprocess
    import sys
    import time
    lines = CORPUS.read_text().splitlines(True)
    src = write_jsonl(tmp_path / "big.jsonl", lines * 12)  # ~18 MB: several seconds of work
    proc = subprocess.Popen([sys.executable, "-m", "megatron_llama.data.preprocess_cli", "--input",
                             str(src), "--tokenizer", tok.path, "--output", str(tmp_path / "out"),
                             "--workers", "1", "--quiet"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob("out.bin.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)  # wait until it is writing
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("out.bin.tmp-*"))  # it was interrupted mid-write...
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()  # ...unfinished
