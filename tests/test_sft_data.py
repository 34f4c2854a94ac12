"""SFT data: the chat template (ours == transformers' rendering of its Jinja form), the
preprocessor's files (tokens read by megatron-core, a parallel answer mask), bad records, and
packed rows (labels and masks never cross a sample boundary)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_llama.config import ConfigError
from megatron_llama.data.chat_template import LLAMA2, TemplateError
from megatron_llama.data.instructions_gen import write as write_instructions
from megatron_llama.data.sft_build import _train_chat_tokenizer
from megatron_llama.data.sft_dataset import PackedSFTDataset
from megatron_llama.data.sft_preprocess import mask_prefix, preprocess_sft
from megatron_llama.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ROOT / "data" / "instructions.jsonl"
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What sound does a cow make?"},
        {"role": "assistant", "content": "A cow says moo."},
        {"role": "user", "content": " What is the opposite of hot? "},
        {"role": "assistant", "content": "The opposite of hot is cold."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = _train_chat_tokenizer(str(INSTRUCTIONS), tmp_path_factory.mktemp("tok") / "t", 512, LLAMA2)
    return Tokenizer.load(path)


def test_instruction_set_is_reproducible(tmp_path):
    assert write_instructions(tmp_path / "i.jsonl").read_bytes() == INSTRUCTIONS.read_bytes()


def test_mask_covers_exactly_the_answers_and_their_eos(tok):
    ids, mask = LLAMA2.encode(CHAT, tok)
    assert len(ids) == len(mask)
    answers = [tok.decode(ids[i] for i in range(len(ids)) if mask[i] and ids[i] != tok.eos_id)]
    assert answers[0].split() == "A cow says moo. The opposite of hot is cold.".split()
    assert [ids[i] for i in range(len(ids)) if mask[i] and ids[i] == tok.eos_id] == [tok.eos_id] * 2
    assert ids.count(tok.bos_id) == 2 and not any(mask[i] for i in range(len(ids)) if ids[i] == tok.bos_id)
    prompt = tok.decode(i for i, m in zip(ids, mask) if not m)
    assert "<<SYS>>\nBe brief.\n<</SYS>>\n\nWhat sound does a cow make? [/INST]" in prompt
    assert "[INST] What is the opposite of hot? [/INST]" in prompt


def test_jinja_template_renders_the_same_ids_in_transformers(tok, tmp_path):
    """A Hugging Face tokenizer directory (tokenizer.model + tokenizer_config.json, as an export
    writes it) with our template's entries: transformers' own apply_chat_template gives exactly
    the ids we train on, and the generation prompt is their prefix up to the first answer."""
    import shutil

    from transformers import AutoTokenizer
    shutil.copyfile(tok.path, tmp_path / "tokenizer.model")
    conf = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, **LLAMA2.hf_tokenizer_config()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    hf = AutoTokenizer.from_pretrained(tmp_path)

    def ids_of(messages):
        out = hf.apply_chat_template(messages, tokenize=True)
        return list(out if isinstance(out, list) else out["input_ids"])

    ids, _ = LLAMA2.encode(CHAT, tok)
    assert ids_of(CHAT) == ids
    prompt = CHAT[:2]
    assert ids_of(prompt) == LLAMA2.encode_prompt(prompt, tok) == ids[:len(ids_of(prompt))]
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template([CHAT[2], CHAT[1]], tokenize=False)


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty answer"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "roles in a wrong order"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "roles in a wrong order"),
    ([{"role": "user", "content": "q"}], "no final answer"),
    ([{"role": "user", "content": "say [/INST] x"}, {"role": "assistant", "content": "a"}], "template markup"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "content not a string"),
    ([{"role": "bot", "content": "q"}], "unknown role"),
])
def test_unrenderable_conversations_are_refused(tok, messages, reason):
    with pytest.raises(TemplateError, match=reason):
        LLAMA2.encode(messages, tok)


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = [{"prompt": "What sound does a cow make?", "response": "A cow says moo."},
        {"messages": CHAT}, {"prompt": "Repeat after me: the red fox", "response": "The red fox.",
                             "system": "Be brief."}]
BAD = ["{not json", {"foo": 1}, {"prompt": "q", "response": ""},
       {"messages": [CHAT[2], CHAT[1]]}, {"prompt": "[INST] q", "response": "a"}]


def test_preprocess_writes_megatron_tokens_and_a_parallel_mask(tmp_path, tok):
    src = _write(tmp_path / "in.jsonl", GOOD + BAD)
    s = preprocess_sft([str(src)], str(tmp_path / "out"), tok.path, progress=False)
    assert (s.samples, s.skipped) == (3, 5)
    assert s.reasons == {"invalid JSON": 1, "unknown record shape": 1, "empty answer": 1,
                         "roles in a wrong order": 1, "template markup in content": 1}
    tokens, masks = IndexedDataset(str(tmp_path / "out")), IndexedDataset(mask_prefix(str(tmp_path / "out")))
    assert len(tokens) == len(masks) == 3
    for i, rec in enumerate(GOOD):
        messages = rec.get("messages") or ([{"role": "system", "content": rec["system"]}] if "system" in rec else []) + [
            {"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        ids, mask = LLAMA2.encode(messages, tok)
        assert tokens[i].tolist() == ids and masks[i].tolist() == mask
    info = json.loads((tmp_path / "out.sft.json").read_text())
    assert info["chat_template"] == "llama2" and info["tokenizer_sha256"] == tok.checksum
    assert info["answer_tokens"] == sum(int(masks[i].sum()) for i in range(3))


def test_overlong_records_truncated_or_dropped_and_counted(tmp_path, tok):
    short = GOOD[0]
    long_answer = {"prompt": short["prompt"], "response": "A cow says moo. " * 10}
    long_prompt = {"prompt": "Tell me. " * 30 + short["prompt"], "response": "Moo."}
    src = _write(tmp_path / "in.jsonl", [short, long_answer, long_prompt])
    limit = len(LLAMA2.encode([{"role": "user", "content": short["prompt"]},
                               {"role": "assistant", "content": short["response"]}], tok)[0])
    s = preprocess_sft([str(src)], str(tmp_path / "t"), tok.path, seq_len=limit, progress=False)
    # the long answer is cut (some answer left), the long prompt leaves no answer: dropped
    assert (s.samples, s.truncated, s.reasons) == (2, 1, {"longer than seq_len": 1})
    assert "no answer token is left" in s.bad_examples[0][2]
    assert IndexedDataset(str(tmp_path / "t")).sequence_lengths.tolist() == [limit, limit]
    s = preprocess_sft([str(src)], str(tmp_path / "d"), tok.path, seq_len=limit, overlong="drop", progress=False)
    assert (s.samples, s.truncated, s.reasons) == (1, 0, {"longer than seq_len": 2})


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tok):
    src = _write(tmp_path / "bad.jsonl", BAD)
    cmd = [sys.executable, "-m", "megatron_llama.data.preprocess_cli", "--sft", "--input", str(src),
           "--tokenizer", tok.path, "--output", str(tmp_path / "o"), "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.startswith("error: no usable records") and len(p.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("o*"))  # nothing left behind
    p = subprocess.run(cmd + ["--overlong", "cut"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "--overlong 'cut'" in p.stderr and len(p.stderr.splitlines()) == 1
    _write(src, GOOD + BAD)
    p = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and f"{src}:4: invalid JSON" in p.stderr and not list(tmp_path.glob("o*"))


def test_packed_rows_keep_samples_apart(tmp_path, tok):
    src = _write(tmp_path / "in.jsonl", [json.loads(x) for x in INSTRUCTIONS.read_text().splitlines()[:200]])
    preprocess_sft([str(src)], str(tmp_path / "p"), tok.path, progress=False)
    prefix = str(tmp_path / "p")
    ds = PackedSFTDataset([prefix], [mask_prefix(prefix)], 96, seed=3, overlong="truncate", pad_id=tok.eos_id,
                          tokenizer=tok, source="test")
    assert ds.num_samples == 200 and len(ds) < 200
    raw, raw_mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    seen = []
    for r in range(len(ds)):
        tokens, labels, mask, segments = ds[r]
        for seg in np.unique(segments):
            where = np.flatnonzero(segments == seg)
            assert np.all(np.diff(where) == 1), "a sample occupies one contiguous span"
            last = where[-1]
            assert mask[last] == 0, "the last token of a sample predicts nothing (no cross-sample label)"
            if seg == segments.max() and tokens[last] == tok.eos_id and mask[where].sum() == 0:
                continue  # padding
            assert labels[where[:-1]].tolist() == tokens[where[1:]].tolist()
            # a span is a whole sample: its ids, and its answer mask shifted onto the labels
            seen.append((tuple(tokens[where]), tuple(mask[where[:-1]])))
    expected = [(tuple(raw[j]), tuple(raw_mask[j][1:])) for j in range(len(raw))]
    assert sorted(seen) == sorted(expected)  # every sample exactly once per epoch


def test_trainer_refuses_mismatched_sft_data(tmp_path, tok):
    from megatron_llama.config import load_config
    from megatron_llama.data.sft_build import build_sft_dataset
    src = _write(tmp_path / "in.jsonl", GOOD)
    preprocess_sft([str(src)], str(tmp_path / "p"), tok.path, progress=False)
    base = ["model.preset=tiny", "data.sft=true", "data.seq_len=64", f"data.tokenizer={tok.path}"]
    other = Tokenizer.load(_train_chat_tokenizer(str(src), tmp_path / "other", 300, LLAMA2))
    cases = [([f"data.sources=[{tmp_path / 'p'}]", f"data.tokenizer={other.path}"], "another tokenizer"),
             ([f"data.sources=[{tmp_path / 'missing'}]"], "not an SFT dataset"),
             ([f"data.sources=[{{path: {tmp_path / 'p'}, weight: 2}}]"], "weight is not supported"),
             (["data.synthetic=true"], "SFT needs real conversations")]
    for extra, msg in cases:
        cfg = load_config(None, base + extra)
        with pytest.raises(ConfigError, match=msg):
            build_sft_dataset(cfg.data, 0, cfg.model.vocab_size)
    Path(f"{mask_prefix(str(tmp_path / 'p'))}.bin").write_bytes(b"\0" * 3)
    cfg = load_config(None, base + [f"data.sources=[{tmp_path / 'p'}]"])
    with pytest.raises(ConfigError, match="loss mask"):
        build_sft_dataset(cfg.data, 0, cfg.model.vocab_size)
    with pytest.raises(ConfigError, match="sft_overlong"):
        load_config(None, base + ["data.sft_overlong=cut"])
    # a pretraining corpus given as SFT data: one line naming the problem, nothing left behind
    cfg = load_config(None, ["model.preset=tiny", "data.sft=true", "data.seq_len=64",
                             f"data.corpus={ROOT / 'data' / 'corpus.jsonl'}", f"data.tokenizer={tok.path}",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match="no usable records.*unknown record shape"):
        build_sft_dataset(cfg.data, 0, cfg.model.vocab_size)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_llama2_sft_recipe_config():
    from launch.train import validate_layout
    from megatron_llama.config import load_config
    cfg = load_config(ROOT / "configs" / "llama2-7b-sft.yaml")
    t = cfg.train
    assert (cfg.model.name, cfg.data.seq_len, cfg.data.sft, cfg.data.chat_template) == ("llama2-7b", 4096, True, "llama2")
    assert (t.lr, t.weight_decay, t.min_lr_ratio, t.precision) == (2e-5, 0.1, 0.0, "bf16")
    assert t.init_from.startswith("hf:")
    assert validate_layout(cfg, 8) == 4 and t.micro_batch_size * t.grad_accum_steps * 4 == 64
