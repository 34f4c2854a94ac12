"""The embedded corpus ships with the repository and is reproduced by its generator."""
import json
from pathlib import Path

from megatron_llama.data.corpus_gen import write

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus.jsonl"


def test_generator_reproduces_the_committed_file(tmp_path):
    assert write(tmp_path / "c.jsonl").read_bytes() == CORPUS.read_bytes()


def test_corpus_is_small_jsonl_with_learnable_kinds():
    assert CORPUS.stat().st_size <= 2_000_000
    docs = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    assert all(isinstance(d["text"], str) and d["text"] for d in docs)
    assert {d["kind"] for d in docs} == {"arithmetic", "counting", "sentences", "story"}
    sums = [line for d in docs if d["kind"] == "arithmetic" for line in d["text"].split("\n")]
    assert all(eval(line.replace("=", "==")) for line in sums[:500])  # the facts are true
