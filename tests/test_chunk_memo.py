"""The byte-level BPE chunk memo (``chunk_memo``) gives exactly ``tokenizers``' ids: on the shipped
corpus and instructions, adversarial strings, a seeded fuzz, for a trained BPE, Meta's tiktoken
format and the Qwen2 pattern; any other layout keeps ``tokenizers`` alone. Real ``tokenizers``."""
import json
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_llama.data.chunk_memo import CHECKED_PATTERNS, ChunkMemo, cut_points, fast_path_refusal
from megatron_llama.data.preprocess import preprocess
from megatron_llama.data.tokenizer import load_tokenizer
from megatron_llama.data.tokenizer_hf import TRAINED_SPECIALS, HFTokenizer, train_bpe_bytelevel
from megatron_llama.data.tokenizer_tiktoken import LLAMA3_SPECIALS, bytes_to_unicode, ranks_to_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
SPECIAL = {"bos_token": TRAINED_SPECIALS[0], "eos_token": TRAINED_SPECIALS[1]}
ADVERSARIAL = [
    "", " ", "  ", "x", "x ", " x", "x  y", "x   y", "a \n b", "a\n  b", "a\n\n  b\n", "a \t b", "\t\tx y",
    "a\r\n  b", "a \r\n b", "end.  \n\n", "  lead and trail  ", "   ", "\n", "\n \n", " \n x", "x\n\n\ny",
    "it's IT'S we'LL He'd 'S 'll 's' 'x", "don't  'm ' 're'  've", "1 22 333 4444 55555 666666 7777777",
    "x1 1x 12ab 3.14159 1,000,000", "!!! ...\n  ?!\r\n\n", "a.\n\n\tb,\r\n  c;  \n", "(x) [y] {z}  <a>",
    "日本語の テキスト 東京 2024年", "٣٤٥ ١٢ x²  x³ ½", "e\u0301 a\u0300\u0301 \u0301x  \u0301", "a\u00a0b \u00a0 c",
    "a\u3000b \u3000c", "a\u2009b \u2009 c", "a\u0085b \u0085 c", "x\x1c y\x1d z\x1e w\x1f v", "x\x0b y \x0c z",
    "a <|eot_id|> b<|end_of_text|>c <|begin_of_text|>", "🙂 👩\u200d👩\u200d👧 x🙂 🙂x", "ſ 'ſ 'K K", "a\x00 b \x00",
    "\u2028a \u2029 b", "tab\there  and\tthere ", "mixed É é ß SS 'É", " ' ' '  '",
]
ALPHABET = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\r", "a", "b", "Zq", "word", "The", "'s", "'S", "'LL", "'ll",
            "'d", "'", "0", "7", "12", "345", "6789", ".", ",", "!", "(", ")", "{", '"', "-", "_", "=", "日本", "語",
            "é", "e\u0301", "\u0301", "٣", "²", "\u00a0", "\u3000", "\u2009", "\u0085", "\x1c", "\x1d", "\x1e", "\x1f",
            "\x0b", "\x0c", "\x00", "<|eot_id|>", "<|end_of_text|>", "🙂", "👩\u200d👧", "ſ", "K", "\u2028"]


def fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def texts_of(path: Path, n: int) -> list[str]:
    out = []
    with open(path) as f:
        for _, line in zip(range(n), f):
            row = json.loads(line)
            out += [row[k] for k in ("text", "prompt", "response") if k in row]
            out += [m["content"] for m in row.get("messages", [])]
    return out


def reference(tok: HFTokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    """``tokenizers`` alone, one text at a time: flat ids with EOS after each, lengths."""
    ids = [tok.tk.encode(t, add_special_tokens=False).ids + [tok.eos_id] for t in texts]
    return [i for doc in ids for i in doc], [len(doc) for doc in ids]


def assert_exact(tok: HFTokenizer, texts: list[str], batch: int = 97) -> None:
    assert tok.chunk_memo is not None, tok.chunk_memo_refusal
    want_ids, want_lengths = reference(tok, texts)
    got = [tok.encode_documents(texts[k:k + batch], np.uint32) for k in range(0, len(texts), batch)]
    assert np.concatenate([g[0] for g in got]).tolist() == want_ids
    assert np.concatenate([g[1] for g in got]).tolist() == want_lengths


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """Trained on the corpus and on the fuzz alphabet too, so that runs of spaces, newlines and
    digits are tokens: a wrong cut changes ids."""
    d = tmp_path_factory.mktemp("b")
    rows = texts_of(DATA / "corpus.jsonl", 3000) + ADVERSARIAL * 20 + fuzz(4000, seed=1)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows if t))
    return load_tokenizer(train_bpe_bytelevel([str(d / "train.jsonl")], str(d / "tok"), 1200))


@pytest.fixture(scope="module")
def tiktoken_kind(bpe) -> HFTokenizer:
    """Meta's format read back (ignore_merges, 256 specials), from the trained BPE's byte tokens."""
    inv = {c: b for b, c in bytes_to_unicode().items()}
    vocab = sorted(bpe.tk.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    ranks = {bytes(inv[c] for c in s): r for r, (s, _) in enumerate(v for v in vocab if v[0] not in TRAINED_SPECIALS)}
    tk = ranks_to_tokenizer(ranks, LLAMA3_SPECIALS)
    return HFTokenizer(tk.to_str(), dict(zip(("bos_token", "eos_token"), LLAMA3_SPECIALS)), "tiktoken")


def test_every_cut_is_a_pretoken_boundary_of_the_whole_text(bpe):
    """The claim itself, against ``tokenizers``' own pre-tokenizer: cuts are pre-token starts."""
    for text in ADVERSARIAL + fuzz(3000) + texts_of(DATA / "corpus.jsonl", 300):
        raw = text.encode()
        cuts = {len(raw[:p].decode()) for p in cut_points(np.frombuffer(raw + b"\xfe", np.uint8)) if p < len(raw)}
        starts = {start for _, (start, _) in bpe.tk.pre_tokenizer.pre_tokenize_str(text)}
        assert cuts <= starts, (text, sorted(cuts - starts))


def with_spec(bpe: HFTokenizer, change) -> HFTokenizer:
    spec = json.loads(bpe.tokenizer_json)
    change(spec)
    return HFTokenizer(json.dumps(spec), SPECIAL, "changed")


def test_memo_ids_equal_tokenizers_on_the_shipped_data(bpe, tiktoken_kind):
    texts = texts_of(DATA / "corpus.jsonl", 1500) + texts_of(DATA / "instructions.jsonl", 300)
    for tok in (bpe, tiktoken_kind):
        assert_exact(tok, texts)
        assert_exact(tok, texts)  # again, every chunk now from the memo
        assert tok.chunk_memo.hit_rate() > 0.5


def test_memo_ids_equal_tokenizers_on_adversarial_and_fuzzed_text(bpe, tiktoken_kind):
    qwen2 = with_spec(bpe, lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(
        pattern={"Regex": CHECKED_PATTERNS[1]}))
    # special tokens that strip the spaces around them: with encode_special_tokens they are text
    stripping = with_spec(bpe, lambda s: [t.update(lstrip=True, rstrip=True) for t in s["added_tokens"]])
    texts = ADVERSARIAL + fuzz(3000)
    for tok in (bpe, tiktoken_kind, qwen2, stripping):
        assert_exact(tok, texts)
        assert_exact(tok, [" ".join(texts[k:k + 5]) for k in range(0, len(texts), 5)], batch=31)
    word = bpe.tk.id_to_token(bpe.encode("x the")[-1])  # an EOS that text makes too
    assert_exact(HFTokenizer(bpe.tokenizer_json, {"eos_token": word}, "word-eos"), texts + ["the the"] * 3)
    tiny = HFTokenizer(bpe.tokenizer_json, SPECIAL, "tiny")
    tiny.chunk_memo = ChunkMemo(tiny.tk, tiny.eos_id, max_entries=40)  # emptied on every batch
    assert_exact(tiny, texts, batch=13)
    assert len(tiny.chunk_memo.memo) <= 40


def test_other_layouts_keep_tokenizers_alone(bpe):
    def split(s):
        return s["pre_tokenizer"]["pretokenizers"][0]
    changes = {
        "it has a normalizer": lambda s: s.update(normalizer={"type": "NFC"}),
        "its Split is not a checked pattern": lambda s: split(s).update(
            pattern={"Regex": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"}),
        "its ByteLevel step adds a prefix space": lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(
            add_prefix_space=True),
        "its model is not a BPE without dropout": lambda s: s["model"].update(dropout=0.5),
        "it has non-special added tokens": lambda s: s["added_tokens"].append(
            {"id": 700, "content": "x y", "single_word": False, "lstrip": False, "rstrip": True,
             "normalized": False, "special": False}),
    }
    texts = ADVERSARIAL + ["x y z", "a x y b"]
    for why, change in changes.items():
        tok = with_spec(bpe, change)
        assert tok.chunk_memo is None and tok.chunk_memo_refusal.startswith(why)
        if "dropout" not in why:  # dropout: random ids, nothing to compare
            tokens, lengths = tok.encode_documents(texts, np.uint32)
            assert (tokens.tolist(), lengths.tolist()) == reference(tok, texts)
    assert fast_path_refusal(json.loads(bpe.tokenizer_json)) is None


def test_preprocess_writes_the_same_bytes_with_and_without_the_memo(bpe, tmp_path):
    for memo in (True, False):
        preprocess([str(DATA / "corpus.jsonl")], str(tmp_path / f"m{memo}"), bpe.path, workers=1,
                   progress=False, chunk_memo=memo)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mTrue{ext}").read_bytes() == (tmp_path / f"mFalse{ext}").read_bytes()


def test_truncation_and_padding_saved_in_a_tokenizer_json_do_not_cut_documents(bpe):
    """A tokenizer.json saved with truncation (here to 8 tokens) and padding set encodes whole
    documents: preprocessing never cuts or pads text through the tokenizer."""
    tok = bpe
    spec = json.loads(tok.tokenizer_json)
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": tok.id_to_token(0)}
    cut = HFTokenizer(json.dumps(spec), tok.special, tok.path)
    text = "a document much longer than eight tokens, " * 5
    assert cut.encode(text) == tok.encode(text) and len(cut.encode(text)) > 8
