"""The ``tokenizers`` and ``tiktoken`` kinds behind the one tokenizer interface: detection, a
deterministic byte-level BPE, Meta's tiktoken file (ids == ``tiktoken``'s), 32-bit token storage
read by megatron-core, the llama3 chat template (== ``transformers``' apply_chat_template), export
loaded by ``AutoTokenizer``, and bad input. Real tokenizers / tiktoken / transformers, tiny vocabularies."""
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_llama.config import ConfigError
from megatron_llama.data.tokenizer import load_tokenizer
from megatron_llama.data.tokenizer_cli import main as tokenizer_main
from megatron_llama.data.tokenizer_hf import LLAMA3_PATTERN, TRAINED_SPECIALS, HFTokenizer, train_bpe_bytelevel
from megatron_llama.data.tokenizer_tiktoken import LLAMA3_SPECIALS, bytes_to_unicode, tiktoken_to_tokenizer_json

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus.jsonl"
TEXTS = ["Hello world!  The   red fox 12345 sees\n\n\tthe cat's hat.", "ünïcödé Ωμέγα 中文字 🙂👩‍👩‍👧",
         "    indented\n        code = x[1:3] == 'a'\r\n", "aaaa bbbbbbbb ===== ...... ", "\n\n\n  \n", " ", "x"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    return load_tokenizer(train_bpe_bytelevel([str(CORPUS)], str(tmp_path_factory.mktemp("bpe") / "t"), 700))


def _corpus_texts(n: int = 200) -> list[str]:
    with open(CORPUS) as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def test_trained_bpe_layout_round_trip_and_determinism(bpe, tmp_path):
    assert (bpe.kind, bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.pad_id) == ("tokenizers", 700, 0, 1, -1)
    assert [bpe.token_to_id(s) for s in TRAINED_SPECIALS] == [0, 1, 2, 3, 4]
    for text in TEXTS + _corpus_texts(50):
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]
    # special-token strings in text are text: a document never gets an EOS in its middle
    ids = bpe.encode("a <|end_of_text|> b <|eot_id|>")
    assert not set(ids) & set(range(5)) and bpe.decode(ids) == "a <|end_of_text|> b <|eot_id|>"
    again = train_bpe_bytelevel([str(CORPUS)], str(tmp_path / "again"), 700)
    assert Path(again).read_bytes() == Path(bpe.path).read_bytes()
    assert load_tokenizer(tmp_path / "again").checksum == bpe.checksum  # the directory works too


def test_cli_train_and_info_for_both_kinds(tmp_path, capsys):
    assert tokenizer_main(["train", "--kind", "bpe-bytelevel", "--input", str(CORPUS), "--vocab-size", "400",
                           "--output", str(tmp_path / "bpe")]) == 0
    assert tokenizer_main(["train", "--input", str(CORPUS), "--vocab-size", "400", "--output", str(tmp_path / "sp")]) == 0
    capsys.readouterr()
    for path, kind, vocab in ((tmp_path / "bpe", "tokenizers", 400), (tmp_path / "sp.model", "sentencepiece", 400)):
        assert tokenizer_main(["info", str(path), "--json"]) == 0
        facts = json.loads(capsys.readouterr().out)
        assert (facts["kind"], facts["vocab_size"]) == (kind, vocab)


def _tiktoken_file(bpe: HFTokenizer, path: Path) -> dict:
    """Meta's format from the trained BPE: its regular tokens as bytes, rank = id order (a merge's
    result always comes after its parts)."""
    inv = {c: b for b, c in bytes_to_unicode().items()}
    vocab = bpe.tk.get_vocab(with_added_tokens=False)
    tokens = [bytes(inv[c] for c in s) for s, _ in sorted(vocab.items(), key=lambda kv: kv[1])
              if s not in TRAINED_SPECIALS]
    ranks = {t: r for r, t in enumerate(tokens)}
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_file_gives_tiktokens_ids_and_exports_as_tokenizer_json(bpe, tmp_path):
    import tiktoken
    from transformers import AutoTokenizer
    ranks = _tiktoken_file(bpe, tmp_path / "tokenizer.model")
    ref = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)})
    tok = load_tokenizer(tmp_path)  # a directory holding Meta's tokenizer.model
    assert tok.kind == "tiktoken" and tok.vocab_size == len(ranks) + 256 == ref.n_vocab
    assert (tok.bos_id, tok.eos_id) == (len(ranks), len(ranks) + 1)
    assert tok.token_to_id("<|eot_id|>") == ref.encode("<|eot_id|>", allowed_special="all")[0]
    texts = TEXTS + _corpus_texts()
    assert tok.encode_batch(texts) == [ref.encode_ordinary(t) for t in texts]
    written = tiktoken_to_tokenizer_json(tmp_path / "tokenizer.model", tmp_path / "hf", model_max_length=4096)
    assert sorted(written) == ["tokenizer.json", "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf("The river", add_special_tokens=True).input_ids == [tok.bos_id, *ref.encode_ordinary("The river")]
    assert hf.eos_token_id == tok.eos_id and load_tokenizer(tmp_path / "hf").encode(texts[0]) == tok.encode(texts[0])
    (tmp_path / "tokenizer.json").write_bytes((tmp_path / "hf" / "tokenizer.json").read_bytes())
    assert load_tokenizer(tmp_path).kind == "tiktoken"  # with both, a directory means its tokenizer.model


def test_more_than_65535_ids_are_stored_in_32_bits_and_megatron_core_reads_them(tmp_path):
    """megatron-core's .idx has no uint32 dtype code (0.16.1: uint8 int8 int16 int32 int64 float64
    float32 uint16); from 65,500 ids on, it and we store int32 (code 4), which holds any vocabulary.
    The 84k-id BPE: the bytes, then every lowercase pair and triple and every word of four of a-p."""
    import itertools
    import string

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_llama.data.preprocess import preprocess
    from megatron_llama.data.tokenizer_tiktoken import ranks_to_tokenizer
    words = [bytes([b]) for b in range(256)]
    for n, letters in ((2, string.ascii_lowercase), (3, string.ascii_lowercase), (4, "abcdefghijklmnop")):
        words += ["".join(w).encode() for w in itertools.product(letters, repeat=n)]
    ranks = {w: r for r, w in enumerate(words)}
    tk = ranks_to_tokenizer(ranks, LLAMA3_SPECIALS[:2])
    HFTokenizer(tk.to_str(), dict(zip(("bos_token", "eos_token"), LLAMA3_SPECIALS)), "x").write_hf(tmp_path / "big")
    tok = load_tokenizer(tmp_path / "big")
    assert tok.vocab_size == len(ranks) + 2 == 84_046 and tok.eos_id == 84_045
    docs = ["pony ponm lake abcd", "pppp and mmmm, the end"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([str(tmp_path / "c.jsonl")], str(tmp_path / "out"), str(tmp_path / "big"), workers=1, progress=False)
    assert (tmp_path / "out.idx").read_bytes()[17] == 4  # the dtype code byte: int32
    ds = IndexedDataset(str(tmp_path / "out"), multimodal=False, mmap=True)
    assert ds[0].dtype == np.int32
    for i, d in enumerate(docs):
        assert ds[i].tolist() == tok.encode(d) + [tok.eos_id]
    assert ranks[b"ponm"] in ds[0].tolist() and ranks[b"ponm"] > 65_535 and ds[1][-1] == 84_045


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What sound does a cow make?"},
        {"role": "assistant", "content": "A cow says moo."},
        {"role": "user", "content": " What is the opposite of hot? "},
        {"role": "assistant", "content": "!The opposite\n of hot is cold."}]


def test_llama3_template_gives_transformers_ids_and_masks_answers_with_eot(bpe, tmp_path):
    from transformers import AutoTokenizer

    from megatron_llama.data.chat_template import LLAMA3
    ids, mask = LLAMA3.encode(CHAT, bpe)
    eot = bpe.token_to_id("<|eot_id|>")
    answers = [i for i, m in zip(ids, mask) if m]
    assert bpe.decode(answers) == "A cow says moo.<|eot_id|>!The opposite\n of hot is cold.<|eot_id|>"
    assert ids.count(eot) == 5 and answers.count(eot) == 2 and ids[0] == bpe.bos_id
    bpe.write_hf(tmp_path, 4096, LLAMA3.hf_tokenizer_config())
    hf = AutoTokenizer.from_pretrained(tmp_path)

    def ids_of(messages, **kw):
        out = hf.apply_chat_template(messages, tokenize=True, **kw)
        return list(out if isinstance(out, list) else out["input_ids"])

    assert ids_of(CHAT) == ids
    prompt = ids_of(CHAT[:2], add_generation_prompt=True)
    assert prompt == LLAMA3.encode_prompt(CHAT[:2], bpe) == ids[:len(prompt)]
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template([CHAT[2], CHAT[1]], tokenize=False)


def test_llama3_template_needs_llama3_special_tokens(tmp_path):
    from megatron_llama.data.chat_template import LLAMA3
    from megatron_llama.data.tokenizer_sp import train_tokenizer
    sp = load_tokenizer(train_tokenizer([str(CORPUS)], str(tmp_path / "sp"), 400))
    with pytest.raises(ConfigError, match="no <\\|begin_of_text\\|> token"):
        LLAMA3.encode(CHAT, sp)


def test_bad_tokenizer_files_are_config_errors(bpe, tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    cases = {tmp_path / "j": "not a Hugging Face tokenizer.json", tmp_path: "neither tokenizer.json",
             tmp_path / "missing.json": "does not exist"}
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "tokenizer.json").write_text(bpe.tokenizer_json)
    cases[tmp_path / "k"] = "no tokenizer_config.json"
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "tokenizer.json").write_text(bpe.tokenizer_json)
    (tmp_path / "l" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    cases[tmp_path / "l"] = "eos_token '<|nope|>' is not in the vocabulary"
    (tmp_path / "t.model").write_text("aGVsbG8= 0\nd29ybGQ= 7\n")
    cases[tmp_path / "t.model"] = "ranks are not 0..1"
    for path, words in cases.items():
        with pytest.raises(ConfigError, match=words.replace("|", "\\|")):
            load_tokenizer(path)


def _cli(name):
    def run(*argv):
        if name == "train":
            from launch.train import main
            return main([str(ROOT / "configs" / "tiny-cpu-3d.yaml"), *argv])
        if name == "preprocess":
            from megatron_llama.data.preprocess_cli import main
        else:
            from megatron_llama.data.tokenizer_cli import main
        return main(list(argv))
    return run


BAD_INPUT = {  # name: (cli, argv with {bad} / {bpe} / {dir} placeholders, words the error line must contain)
    "tokenizer.json that is not one": ("preprocess", ["--input", str(CORPUS), "--tokenizer", "{bad}",
                                                      "--output", "{dir}/c"], "not a Hugging Face tokenizer.json"),
    "tokenizer.json that is not one (info)": ("tokenizer", ["info", "{bad}"], "not a Hugging Face tokenizer.json"),
    "more ids than model.vocab_size": ("train", ["data.tokenizer={bpe}", "train.save_dir={dir}/run",
                                                 "data.cache_dir={dir}/data"], "model.vocab_size is 512"),
    "more ids than model.vocab_size (SFT)": ("train", ["data.tokenizer={bpe}", "data.sft=true", "data.valid_fraction=0",
                                                       f"data.corpus={ROOT / 'data' / 'instructions.jsonl'}",
                                                       "train.save_dir={dir}/run", "data.cache_dir={dir}/data"],
                                             "set model.vocab_size >= 700"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_status_2(name, bpe, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cli, argv, words = BAD_INPUT[name]
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"vocab": "not a tokenizer"}}')
    argv = [a.format(bad=tmp_path / "bad" / "tokenizer.json", bpe=bpe.path, dir=work) for a in argv]
    assert _cli(cli)(*argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    assert list(work.iterdir()) == []  # nothing written


def test_export_of_an_sft_run_tokenizer_json_carries_the_llama3_template(bpe, tmp_path):
    """What native-to-hf writes for an SFT run with a tokenizer.json: tokenizer.json +
    tokenizer_config.json with the chat template; config.json gets the tokenizer's special ids."""
    import torch
    from transformers import AutoTokenizer

    from checkpoints_tools.hf_export import write_hf_config, write_tokenizer
    from megatron_llama.config.presets import preset
    from megatron_llama.data.chat_template import LLAMA3
    write_hf_config(tmp_path, preset("tiny"), torch.float32)
    assert "tokenizers" in write_tokenizer(tmp_path, bpe.path, 256, LLAMA3.hf_tokenizer_config())
    assert sorted(p.name for p in tmp_path.glob("tokenizer*")) == ["tokenizer.json", "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(tmp_path)
    out = hf.apply_chat_template(CHAT, tokenize=True)
    assert list(out if isinstance(out, list) else out["input_ids"]) == LLAMA3.encode(CHAT, bpe)[0]
    conf = json.loads((tmp_path / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (bpe.bos_id, bpe.eos_id) == (hf.bos_token_id, hf.eos_token_id)


def test_llama3_sft_quickstart_corpus_trains_a_bytelevel_bpe_that_export_finds(tmp_path):
    """data.chat_template=llama3 with a raw SFT corpus and no data.tokenizer: the run trains a byte-level
    BPE with Llama 3's special tokens, and native-to-hf's lookup of the run's tokenizer finds it."""
    from megatron_llama.data.run_tokenizer import run_tokenizer
    from megatron_llama.config import DataConfig, RunConfig
    from megatron_llama.config.presets import preset
    from megatron_llama.data.chat_template import LLAMA3
    from megatron_llama.data.sft_build import build_sft_dataset
    data = DataConfig(sft=True, corpus=str(ROOT / "data" / "instructions.jsonl"), chat_template="llama3", seq_len=128,
                      cache_dir=str(tmp_path))
    ds = build_sft_dataset(data, seed=1, model_vocab_size=1024)
    found = run_tokenizer(RunConfig(model=preset("tiny", vocab_size=1024), data=data))
    tok = load_tokenizer(found)
    assert found.endswith("tokenizer.json") and tok.kind == "tokenizers" and len(ds) > 0
    ids, mask = LLAMA3.encode(CHAT, tok)
    assert tok.decode(ids).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
