"""build_train_dataset: packing, blending, corpus cache, and one-line errors for bad input."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_llama.config import ConfigError, DataConfig
from megatron_llama.data import Tokenizer, build_train_dataset, train_tokenizer
from megatron_llama.data.indexed import write_index
from megatron_llama.data.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus.jsonl"
SEQ = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(tmp dir, tokenizer, prefix of the whole corpus, prefix of a corpus of digits only)."""
    d = tmp_path_factory.mktemp("data")
    tok = Tokenizer.load(train_tokenizer([str(CORPUS)], str(d / "tok"), 512))
    preprocess([str(CORPUS)], str(d / "corpus"), tok.path, workers=1, progress=False)
    (d / "digits.jsonl").write_text("".join(json.dumps({"text": " ".join(str(k) for k in range(i, i + 40))})
                                            + "\n" for i in range(300)))
    preprocess([str(d / "digits.jsonl")], str(d / "digits"), tok.path, workers=1, progress=False)
    return d, tok, str(d / "corpus"), str(d / "digits")


def cfg(d, **kw):
    return DataConfig(**{"seq_len": SEQ, "cache_dir": str(d / "cache"), **kw})


def test_windows_are_the_eos_joined_stream_cut(prepared):
    d, tok, corpus, _ = prepared
    ds = build_train_dataset(cfg(d, tokenizer=tok.path, sources=[{"path": corpus}]), 1, 512)
    assert ds.tokenizer.checksum == tok.checksum and "windows of 64+1" in ds.describe()
    windows = np.stack([ds[i] for i in range(len(ds))])
    assert windows.shape == (len(ds), SEQ + 1) and windows.dtype == np.int64
    # In cut order (GPTDataset serves them shuffled), window k ends where window k+1 starts.
    cut_order = windows[np.argsort(np.asarray(ds.inner.shuffle_index[:len(ds)]))]
    assert np.array_equal(cut_order[:-1, -1], cut_order[1:, 0])
    # One epoch, concatenated: every corpus token exactly once except the dropped tail.
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    raw = IndexedDataset(corpus)
    all_tokens = np.concatenate([raw[i] for i in range(len(raw))])
    assert len(ds) == (len(all_tokens) - 1) // SEQ
    got = np.bincount(windows[:, :-1].ravel(), minlength=512)
    want = np.bincount(all_tokens, minlength=512)
    assert (got <= want).all() and (want - got).sum() < SEQ + 1
    assert (windows == tok.eos_id).sum() > len(ds) // 2  # documents are short: EOS inside windows


def test_shuffle_depends_on_seed_only(prepared):
    d, tok, corpus, _ = prepared
    c = cfg(d, tokenizer=tok.path, sources=[{"path": corpus}])
    a, b, other = (build_train_dataset(c, s, 512) for s in (1, 1, 2))
    assert all(np.array_equal(a[i], b[i]) for i in range(20))
    assert not all(np.array_equal(a[i], other[i]) for i in range(20))


def test_blend_weights_and_epochs(prepared):
    d, tok, corpus, digits = prepared
    c = cfg(d, tokenizer=tok.path, sources=[{"path": corpus, "weight": 0.8}, {"path": digits, "weight": 0.2}])
    ds = build_train_dataset(c, 1, 512)
    n_corpus = build_train_dataset(cfg(d, tokenizer=tok.path, sources=corpus), 1, 512).__len__()
    n_digits = build_train_dataset(cfg(d, tokenizer=tok.path, sources=digits), 1, 512).__len__()
    share = np.bincount(np.asarray(ds.inner.dataset_index), minlength=2) / len(ds)
    assert abs(share[1] - 0.2) < 0.01
    # by default the blend is just long enough to see every corpus at least once
    assert abs(len(ds) - max(n_corpus / 0.8, n_digits / 0.2)) <= 1
    # epochs on a source fixes the blend length: the corpus is seen exactly twice
    c2 = cfg(d, tokenizer=tok.path, sources=[{"path": corpus, "weight": 0.8, "epochs": 2},
                                             {"path": digits, "weight": 0.2}])
    ds2 = build_train_dataset(c2, 1, 512)
    count = np.bincount(np.asarray(ds2.inner.dataset_index), minlength=2)
    assert abs(count[0] - 2 * n_corpus) <= 2 and "x2.00 epochs" in ds2.describe()
    # the content follows the ids: about a fifth of the windows are pure digits
    is_digit = [set(tok.decode(ds2[i]).replace(" ", "")) <= set("0123456789") for i in range(0, len(ds2), 7)]
    assert 0.15 < np.mean(is_digit) < 0.25
    # Megatron's --data-path string form parses to the same blend
    ds3 = build_train_dataset(cfg(d, tokenizer=tok.path, sources=f"0.8 {corpus} 0.2 {digits}"), 1, 512)
    assert len(ds3) == len(ds) and np.array_equal(ds3[5], ds[5])


def test_corpus_mode_trains_once_and_caches(prepared, tmp_path):
    c = DataConfig(seq_len=SEQ, corpus=str(CORPUS), cache_dir=str(tmp_path / "cache"))
    calls = []
    ds = build_train_dataset(c, 1, 512, rank_zero_first=lambda fn: calls.append(1) or fn())
    assert ds.tokenizer.vocab_size == 512 and len(calls) == 2  # prepare + index build
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert any(p.suffix == ".model" for p in files) and any(p.suffix == ".idx" for p in files)
    again = build_train_dataset(c, 1, 512)
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rebuilt
    assert np.array_equal(again[3], ds[3]) and again.tokenizer.checksum == ds.tokenizer.checksum


def test_synthetic_is_deterministic():
    ds = build_train_dataset(DataConfig(seq_len=SEQ, synthetic=True), 5, 100)
    assert ds.tokenizer is None and ds[7].shape == (SEQ + 1,) and ds[7].max() < 100
    assert np.array_equal(ds[7], build_train_dataset(DataConfig(seq_len=SEQ, synthetic=True), 5, 100)[7])
    assert "synthetic" in ds.describe()


# --- §6: every bad input is one ConfigError line, before any training step ------------------

def copy_pair(src: str, dst: Path) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(src + ext, str(dst) + ext)
    return str(dst)


def one_line_error(c, model_vocab=512, match=None):
    with pytest.raises(ConfigError, match=match) as e:
        build_train_dataset(c, 1, model_vocab)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_and_truncated_files(prepared, tmp_path):
    d, tok, corpus, digits = prepared
    src = lambda p: cfg(tmp_path, tokenizer=tok.path, sources=[{"path": p}])  # noqa: E731
    one_line_error(src(str(tmp_path / "nowhere")), match=r"nowhere.idx not found.*mllama-preprocess")
    p = copy_pair(corpus, tmp_path / "nobin")
    os.remove(p + ".bin")
    one_line_error(src(p), match="nobin.bin not found")
    p = copy_pair(corpus, tmp_path / "shortbin")
    os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 10)
    one_line_error(src(p), match="does not match its data file")
    p = copy_pair(corpus, tmp_path / "shortidx")
    os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8)
    one_line_error(src(p), match="truncated or corrupt")
    p = copy_pair(corpus, tmp_path / "header")
    os.truncate(p + ".idx", 20)
    one_line_error(src(p), match="not a Megatron index")
    p = copy_pair(corpus, tmp_path / "mixed")  # index of one corpus beside the data of another
    shutil.copy(digits + ".idx", p + ".idx")
    one_line_error(src(p + ".bin"), match="does not match its data file")


def test_tokenizer_mismatches(prepared, tmp_path):
    d, tok, corpus, _ = prepared
    one_line_error(cfg(tmp_path, tokenizer=tok.path, sources=corpus), model_vocab=256,
                   match="512 ids but model.vocab_size is 256")
    small = Tokenizer.load(train_tokenizer([str(d / "digits.jsonl")], str(tmp_path / "small"), 270))
    one_line_error(cfg(tmp_path, tokenizer=small.path, sources=corpus),
                   match="preprocessed with another tokenizer")
    one_line_error(cfg(tmp_path, sources=corpus), match="needs data.tokenizer")
    one_line_error(cfg(tmp_path, tokenizer=str(tmp_path / "none.model"), sources=corpus),
                   match="does not exist")


def test_empty_and_too_small_corpora(prepared, tmp_path):
    d, tok, corpus, _ = prepared
    write_index(tmp_path / "empty.idx", np.uint16, np.zeros(0, np.int32))
    (tmp_path / "empty.bin").write_bytes(b"")
    one_line_error(cfg(tmp_path, tokenizer=tok.path, sources=str(tmp_path / "empty")), match="empty corpus")
    (tmp_path / "tiny.jsonl").write_text('{"text": "just a few tokens"}\n')
    preprocess([str(tmp_path / "tiny.jsonl")], str(tmp_path / "tiny"), tok.path, workers=1, progress=False)
    one_line_error(cfg(tmp_path, tokenizer=tok.path, sources=str(tmp_path / "tiny")),
                   match="fewer than one sequence")
    one_line_error(DataConfig(seq_len=SEQ, corpus=str(tmp_path / "none.jsonl"), cache_dir=str(tmp_path)),
                   match="does not exist")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    one_line_error(DataConfig(seq_len=SEQ, corpus=str(tmp_path / "bad.jsonl"), tokenizer=tok.path,
                              cache_dir=str(tmp_path / "c")), match="no documents")
    one_line_error(DataConfig(seq_len=SEQ), match="no training data")


@pytest.mark.parametrize("sources, match", [
    ([{"path": "a", "weight": "lots"}], "weight 'lots' is not a number"),
    ([{"path": "a", "weight": -1}], "must be a positive number"),
    ([{"path": "a", "weight": 1}, {"path": "b"}], r"sources\[1\] \(b\): no weight"),
    ([{"path": "a", "wieght": 1}], "unknown key"),
    ([{"weight": 1}], "no path"),
    ("0.5 a 0.5", "does not parse"),
    ("x a y b", "is not a number"),
    ([{"path": "a", "weight": 1, "epochs": "two"}], "epochs 'two' is not a number"),
    ([], "no training data"),
    (42, "must be a non-empty list"),
])
def test_blend_specs_that_do_not_parse(prepared, tmp_path, sources, match):
    d, tok, _, _ = prepared
    one_line_error(cfg(tmp_path, tokenizer=tok.path, sources=sources), match=match)


def test_conflicting_epochs(prepared, tmp_path):
    d, tok, corpus, digits = prepared
    one_line_error(cfg(tmp_path, tokenizer=tok.path, sources=[
        {"path": corpus, "weight": 0.5, "epochs": 1}, {"path": digits, "weight": 0.5, "epochs": 1}]),
        match="imply different blend lengths")


# --- distributed: rank 0 prepares, the others load; both see the same data ------------------

def _rank_zero_first(fn):
    import torch.distributed as dist
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
    else:
        dist.barrier()
        out = fn()
    return out


def _dist_build(rank, world, corpus, digits, tokenizer, cache):
    from megatron_llama.data import MicroBatchIterator
    c = DataConfig(seq_len=SEQ, tokenizer=tokenizer, cache_dir=cache,
                   sources=[{"path": corpus, "weight": 0.7}, {"path": digits, "weight": 0.3}])
    ds = build_train_dataset(c, 3, 512, rank_zero_first=_rank_zero_first)
    tokens, _ = next(MicroBatchIterator(ds, 3, 0, rank, world, 4))
    return len(ds), ds[11].tolist(), tokens.tolist()


@pytest.mark.distributed
def test_two_ranks_share_cached_indices_and_read_disjoint_batches(prepared, tmp_path, dist_pool):
    d, tok, corpus, digits = prepared
    (r0, r1) = dist_pool(2).run(_dist_build, corpus, digits, tok.path, str(tmp_path / "cache"))
    assert r0[:2] == r1[:2]  # same length, same window 11 on both ranks
    assert r0[2] != r1[2]    # different micro-batches
    assert list((tmp_path / "cache" / "index-cache" / "blends").glob("*dataset_index.npy"))
