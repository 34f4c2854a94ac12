"""Preference data: the shipped set's generator, ``mllama-preprocess --preference`` (both sides
rendered as SFT conversations, masks on the answers only, margins, bad records counted with
line numbers, over-long pairs), the manifest check at start-up (another tokenizer or template:
one ``error:`` line, exit 2) and the micro-batch contract of preference_dataset.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_llama.config import ConfigError, load_config
from megatron_llama.data.chat_template import LLAMA2
from megatron_llama.data.preference_build import _train_tokenizer, build_preference_dataset
from megatron_llama.data.preference_dataset import PreferenceBatchIterator
from megatron_llama.data.preference_preprocess import preprocess_preference, read_manifest
from megatron_llama.data.preferences_gen import write as write_preferences
from megatron_llama.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PREFERENCES = ROOT / "data" / "preferences.jsonl"
GOOD = [
    {"prompt": "What sound does a cow make?", "chosen": "A cow says moo.", "rejected": "A cow says woof.",
     "margin": 2},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is up?"}],
     "chosen": {"role": "assistant", "content": "The sky."}, "rejected": [{"role": "assistant", "content": "Down."}]},
]
BAD = [
    {"prompt": "Same?", "chosen": "Yes.", "rejected": " Yes. "},                 # identical sides
    {"prompt": "Empty?", "chosen": "Yes.", "rejected": "  "},                    # an empty side
    {"prompt": "Margin?", "chosen": "Yes.", "rejected": "No.", "margin": "big"},  # bad margin
    {"question": "Shape?", "chosen": "Yes.", "rejected": "No."},                 # no prompt/messages
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.load(_train_tokenizer(str(PREFERENCES), tmp_path_factory.mktemp("tok") / "t", 512, LLAMA2))


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_preference_set_is_reproducible_and_pairs_right_with_wrong(tmp_path):
    assert write_preferences(tmp_path / "p.jsonl").read_bytes() == PREFERENCES.read_bytes()
    pairs = [json.loads(line) for line in PREFERENCES.read_text().splitlines()]
    instructions = [json.loads(line) for line in (ROOT / "data" / "instructions.jsonl").read_text().splitlines()]
    assert len(pairs) == len(instructions)
    for p, r in zip(pairs[:200], instructions):
        right = r["response"] if "prompt" in r else r["messages"][-1]["content"]
        chosen = p["chosen"] if isinstance(p["chosen"], str) else p["chosen"]["content"]
        rejected = p["rejected"] if isinstance(p["rejected"], str) else p["rejected"]["content"]
        assert chosen == right and rejected != right


def test_preprocess_writes_both_sides_masks_margins_and_counts_bad_records(tmp_path, tok):
    src = _jsonl(tmp_path / "in.jsonl", GOOD + BAD + ["{not json", ""])
    summary = preprocess_preference([str(src)], str(tmp_path / "pref"), tok.path, progress=False)
    assert summary.pairs == 2 and summary.skipped == 5 and summary.with_margin == 1
    lines = {n for _, n, _ in summary.bad_examples}
    assert lines == {3, 4, 5, 6, 7}
    text = summary.describe()
    for reason in ("identical sides", "empty rejected answer", "bad margin", "unknown record shape", "invalid JSON"):
        assert reason in text
    manifest = read_manifest(str(tmp_path / "pref"), "test")
    assert manifest["tokenizer_sha256"] == tok.checksum and manifest["chat_template"] == "llama2"
    assert manifest["pairs"] == 2 and manifest["skipped"] == 5

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ids = IndexedDataset(str(tmp_path / "pref"), multimodal=False, mmap=True)
    masks = IndexedDataset(str(tmp_path / "pref.lossmask"), multimodal=False, mmap=True)
    assert len(ids) == 4
    for k, record in enumerate(GOOD):  # sequence 2k = chosen, 2k + 1 = rejected, as SFT renders them
        context = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        for side, key in enumerate(("chosen", "rejected")):
            answer = record[key] if isinstance(record[key], str) else (
                record[key]["content"] if isinstance(record[key], dict) else record[key][0]["content"])
            want_ids, want_mask = LLAMA2.encode(context + [{"role": "assistant", "content": answer}], tok)
            assert ids[2 * k + side].tolist() == want_ids and masks[2 * k + side].tolist() == want_mask
    assert np.load(tmp_path / "pref.margin.npy").tolist() == [2.0, 0.0]


def test_overlong_pairs_truncate_or_drop(tmp_path, tok):
    long = {"prompt": "Repeat after me: " + "the red fox " * 30, "chosen": "The red fox.", "rejected": "The cow."}
    src = _jsonl(tmp_path / "in.jsonl", GOOD + [long])
    dropped = preprocess_preference([str(src)], str(tmp_path / "d"), tok.path, seq_len=40, overlong="drop",
                                    progress=False)
    assert dropped.pairs == 2 and "longer than seq_len" in dropped.describe() and dropped.bad_examples[0][1] == 3
    # truncation that cuts the answers off entirely leaves nothing to rank: dropped, said why
    cut = preprocess_preference([str(src)], str(tmp_path / "t"), tok.path, seq_len=40, progress=False)
    assert cut.pairs == 2 and "no answer token left" in cut.describe()


def _config(tmp_path, tokenizer, prefix, **data):
    data = {"seq_len": 48, **data}
    overrides = ["model.preset=tiny", "train.objective=reward", f"data.tokenizer={tokenizer}",
                 f"data.sources=[{{path: {prefix}}}]"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, overrides)


def test_micro_batch_contract(tmp_path, tok):
    recs = GOOD * 6
    src = _jsonl(tmp_path / "in.jsonl", recs)
    preprocess_preference([str(src)], str(tmp_path / "p"), tok.path, progress=False)
    cfg = _config(tmp_path, tok.path, tmp_path / "p")
    ds = build_preference_dataset(cfg.data, 3, cfg.model.vocab_size)
    P, s = 3, cfg.data.seq_len
    batches = [next(PreferenceBatchIterator(ds, 3, 0, r, 2, P)) for r in (0, 1)]
    seen = []
    for tokens, labels, mask, margin, index in batches:
        assert tokens.shape == labels.shape == mask.shape == (2 * P, s)
        assert tokens.dtype == labels.dtype == index.dtype == torch.int64
        assert mask.dtype == margin.dtype == torch.float32 and margin.shape == index.shape == (P,)
        for i in range(P):
            g = int(index[i])
            rec = recs[g]
            assert float(margin[i]) == float(rec.get("margin", 0))
            for row, side in ((i, "chosen"), (P + i, "rejected")):
                answer = tok.decode(int(labels[row, t]) for t in range(s) if mask[row, t] and
                                    labels[row, t] != tok.eos_id)
                want = rec[side] if isinstance(rec[side], str) else (
                    rec[side]["content"] if isinstance(rec[side], dict) else rec[side][0]["content"])
                assert answer.strip() == want  # the template ends an answer with a space
                n = int((mask[row] > 0).nonzero().max()) + 2   # the answer's EOS ends the sample
                assert int(tokens[row, n - 1]) == tok.eos_id and (labels[row, :n - 1] == tokens[row, 1:n]).all()
                assert not mask[row, n - 1:].any()
        seen += index.tolist()
    assert len(set(seen)) == 2 * P  # DP ranks read disjoint pairs
    # the same pairs for the same (seed, consumed, rank): a resumed run reads what it would have read
    again = next(PreferenceBatchIterator(ds, 3, 0, 1, 2, P))
    assert all(torch.equal(a, b) for a, b in zip(again, batches[1]))
    later = PreferenceBatchIterator(ds, 3, 0, 0, 2, P)
    next(later)
    assert torch.equal(next(later)[4], next(PreferenceBatchIterator(ds, 3, 2 * P, 0, 2, P))[4])


def test_held_out_pairs_are_never_trained_on(tmp_path, tok):
    preprocess_preference([str(PREFERENCES)], str(tmp_path / "p"), tok.path, progress=False)
    cfg = _config(tmp_path, tok.path, tmp_path / "p", valid_fraction=0.05)
    train = build_preference_dataset(cfg.data, 1, 512, split="train")
    valid = build_preference_dataset(cfg.data, 1, 512, split="valid")
    assert 100 < len(valid) < 300 and not set(train.pair_index) & set(valid.pair_index)


@pytest.mark.parametrize("what", ["tokenizer", "template"])
def test_a_set_made_with_another_tokenizer_or_template_is_refused(tmp_path, tok, what):
    src = _jsonl(tmp_path / "in.jsonl", GOOD)
    preprocess_preference([str(src)], str(tmp_path / "p"), tok.path, progress=False)
    if what == "tokenizer":
        from megatron_llama.data.sft_build import _train_chat_tokenizer  # the SFT set's tokenizer
        other = Tokenizer.load(_train_chat_tokenizer(str(ROOT / "data" / "instructions.jsonl"), tmp_path / "other",
                                                     400, LLAMA2))
        tokenizer = other.path
    else:  # the manifest of a set made with another template (only llama2 ships: edit the manifest)
        m = json.loads((tmp_path / "p.pref.json").read_text())
        (tmp_path / "p.pref.json").write_text(json.dumps({**m, "chat_template": "chatml"}))
        tokenizer = tok.path
    cfg = _config(tmp_path, tokenizer, tmp_path / "p")
    with pytest.raises(ConfigError, match="another tokenizer" if what == "tokenizer" else "chat template"):
        build_preference_dataset(cfg.data, 1, 512)
    if what == "template":
        return  # the same start-up check: the CLI path is shown once, below
    # the trainer: one error line, exit status 2, before any process starts work
    run = tmp_path / "run.yaml"
    run.write_text(f"model: tiny\ntrain: {{objective: reward, steps: 1, save_dir: {tmp_path / 'out'}}}\n"
                   f"data: {{seq_len: 48, tokenizer: {tokenizer}, sources: [{{path: {tmp_path / 'p'}}}]}}\n")
    out = subprocess.run([sys.executable, "-m", "launch.train", str(run), "train.max_restarts=0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and ("another tokenizer" in errors[0] or "chat template" in errors[0])
    assert "Traceback" not in out.stderr


def test_preprocess_cli_bad_input_is_one_line(tmp_path, tok):
    src = _jsonl(tmp_path / "in.jsonl", BAD)
    out = subprocess.run([sys.executable, "-m", "megatron_llama.data.preprocess_cli", "--preference", "--input",
                          str(src), "--tokenizer", tok.path, "--output", str(tmp_path / "p"), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: no usable pairs") and len(out.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("p.*"))


def test_config_refusals():
    with pytest.raises(ConfigError, match="objective=dpo needs a reference model"):
        load_config(None, ["model.preset=tiny", "train.objective=dpo"])
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config(None, ["model.preset=tiny", "train.objective=reward", "parallel.tp=2",
                           "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="model.head=score"):
        load_config(None, ["model.preset=tiny", "model.head=score"])
    assert load_config(None, ["model.preset=tiny", "train.objective=reward"]).model.head == "score"


def test_trainer_fits_long_pairs_to_seq_len(tmp_path, tok):
    cut_ok = {"prompt": "Say it.", "chosen": "the red fox " * 12, "rejected": "the brown cow " * 12}
    no_answer = {"prompt": "Repeat after me: " + "the red fox " * 30, "chosen": "Yes.", "rejected": "No."}
    src = _jsonl(tmp_path / "in.jsonl", GOOD + [cut_ok, no_answer])
    preprocess_preference([str(src)], str(tmp_path / "p"), tok.path, progress=False)
    truncate = build_preference_dataset(_config(tmp_path, tok.path, tmp_path / "p", seq_len=40).data, 1, 512)
    assert truncate.pair_index.tolist() == [0, 1, 2] and truncate.truncated == 1 and truncate.dropped_long == 1
    tokens, labels, mask, _, _ = truncate[2]
    assert mask[:, 1:].sum(axis=1).min() > 0 and not np.array_equal(tokens[0], tokens[1])
    drop = build_preference_dataset(_config(tmp_path, tok.path, tmp_path / "p", seq_len=40,
                                            preference_overlong="drop").data, 1, 512)
    assert drop.pair_index.tolist() == [0, 1] and drop.dropped_long == 2 and "dropped" in drop.describe()
