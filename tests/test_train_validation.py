"""Validation loss: the same value under every layout, and a held-out split that training never sees."""
import numpy as np
import pytest

from test_train_equivalence import base_overrides, max_diffs


def _valid_run(rank, world, overrides):
    from launch.train import train
    from megatron_llama.config import load_config
    s = train(load_config(None, overrides), max_steps=2, log=False, save=False)
    return s.valid_losses, s.losses


@pytest.mark.distributed
def test_validation_loss_is_layout_independent(dist_pool):
    """TP2·PP2·DP2 (the pipeline engine's eval_batch, DP all-reduce) vs TP1·PP1·DP1 (a plain
    forward): the same held-out windows and the same loss, before and after an optimizer step."""
    extra = ["data.valid_fraction=0.01", "train.eval_interval=1", "train.eval_iters=2"]
    ref_valid, ref_train = dist_pool(1).run(_valid_run, base_overrides("tiny", dp=1) + extra)[0]
    results = dist_pool(8).run(_valid_run, base_overrides("tiny", dp=2) + extra
                               + ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"])
    for valid, _ in results[1:]:
        assert valid == results[0][0]  # every rank reports the same numbers
    valid, train = results[0]
    assert [s for s, _ in valid] == [s for s, _ in ref_valid] == [1, 2]
    got, ref = [v for _, v in valid], [v for _, v in ref_valid]
    print(f"\nvalidation TP2·PP2·DP2 vs TP1·PP1·DP1: {got} vs {ref}, max |d| {max_diffs(got, ref)}")
    assert got == pytest.approx(ref, rel=1e-5, abs=0)
    assert ref[0] != ref[1]  # the step between the two evaluations changed the weights
    assert train == pytest.approx(ref_train, rel=2e-5)


def test_heldout_documents_never_reach_training_windows(tmp_path):
    """A real preprocessed corpus split by data.valid_fraction: the training windows are built
    from the other documents only, the validation windows from the held-out ones."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_llama.config import DataConfig
    from megatron_llama.data import Tokenizer, build_train_dataset, train_tokenizer
    from megatron_llama.data.heldout import heldout_mask
    from megatron_llama.data.preprocess import preprocess
    from pathlib import Path
    lines = (Path(__file__).resolve().parents[1] / "data" / "corpus.jsonl").read_text().splitlines()[:400]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    tok = Tokenizer.load(train_tokenizer([str(tmp_path / "c.jsonl")], str(tmp_path / "tok"), 512))
    preprocess([str(tmp_path / "c.jsonl")], str(tmp_path / "c"), tok.path, workers=1, progress=False)
    cfg = DataConfig(seq_len=16, tokenizer=tok.path, sources=[{"path": str(tmp_path / "c")}],
                     cache_dir=str(tmp_path / "cache"), valid_fraction=0.1)
    train = build_train_dataset(cfg, 3, 512)
    valid = build_train_dataset(cfg, 3, 512, split="valid")
    whole = build_train_dataset(DataConfig(seq_len=16, tokenizer=tok.path, sources=[{"path": str(tmp_path / "c")}],
                                           cache_dir=str(tmp_path / "cache")), 3, 512)
    assert build_train_dataset(DataConfig(synthetic=True, seq_len=16), 3, 512, split="valid") is None
    # data.valid_sources: a separate corpus (here the whole one), read in full
    sources = [{"path": str(tmp_path / "c")}]
    separate = build_train_dataset(DataConfig(seq_len=16, tokenizer=tok.path, sources=sources, valid_sources=sources,
                                              cache_dir=str(tmp_path / "cache")), 3, 512, split="valid")
    assert len(separate) == len(whole)
    from megatron_llama.config import ConfigError
    with pytest.raises(ConfigError, match="valid_sources needs data.tokenizer"):
        build_train_dataset(DataConfig(seq_len=16, corpus="x.jsonl", valid_sources=sources), 3, 512, split="valid")
    held = set(np.flatnonzero(heldout_mask(400, 0.1)).tolist())
    train_docs = set(np.asarray(train.inner.document_index).tolist())
    valid_docs = set(np.asarray(valid.inner.document_index).tolist())
    assert train_docs.isdisjoint(held) and valid_docs == held and train_docs | held == set(range(400))
    # windows are cut from the documents' tokens: the split sizes add up to the whole corpus
    indexed = IndexedDataset(str(tmp_path / "c"))  # keep it alive: its arrays map its file
    tokens = np.array(indexed.sequence_lengths)
    assert abs(len(train) + len(valid) - len(whole)) <= 2
    assert len(valid) == (int(tokens[sorted(held)].sum()) - 1) // 16


def _timed_run(rank, world, overrides, save_dir):
    from launch.run_log import read_records
    from launch.train import train
    from megatron_llama.config import load_config
    train(load_config(None, overrides + [f"train.save_dir={save_dir}"]), log=False, save=True)
    return read_records(save_dir)


@pytest.mark.distributed
def test_step_time_and_throughput_leave_validation_out(dist_pool, tmp_path):
    """metrics.jsonl: the step after an evaluation reports its own time, not the evaluation's
    (eval_iters=60 makes an evaluation about twenty steps long)."""
    extra = ["data.valid_fraction=0.01", "train.steps=8", "train.eval_interval=3", "train.eval_iters=60"]
    records = dist_pool(1).run(_timed_run, base_overrides("tiny", dp=1) + extra, str(tmp_path / "run"))[0]
    train = {r["step"]: r for r in records if r["type"] == "train"}
    valid = {r["step"]: r for r in records if r["type"] == "valid"}
    assert sorted(valid) == [3, 6, 8] and sorted(train) == list(range(1, 9))
    usual = sorted(train[s]["step_time_s"] for s in (2, 3, 5, 6, 8))
    median = usual[2]
    for s in (3, 6):
        took = valid[s]["time"] - train[s]["time"]  # the evaluation, between the two records
        after = train[s + 1]
        assert took > 4 * median, (took, median)
        assert after["step_time_s"] < took / 3, (s + 1, after["step_time_s"], took, median)
        assert after["tokens_per_s"] > 4 * 32 / (took / 3)  # 4 sequences x 32 tokens per step
