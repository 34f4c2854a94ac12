"""Regenerate the offline lm-eval tasks' JSONL from the shipped corpus (deterministic):
``python configs/eval_tasks/generate.py``.

Both tasks ask about the question/answer stories of ``data/corpus.jsonl`` (the first
``--items`` of them, in file order), so a tiny model trained on that corpus has something to get
right. They test the evaluation pipeline offline, not a model's quality: the stories are
training documents.

* ``story_color.jsonl`` (multiple choice): the story up to ``Q: What color are they? A:``, the
  eight colours of the corpus generator as choices, ``gold`` = the index of the story's colour.
* ``story_count.jsonl`` (generation, exact match): the story's first line and
  ``Q: How many <animal>s does <name> have? A:``, ``answer`` = the count as digits.
* ``corpus_sentences.jsonl`` (rolling log-likelihood: word / byte perplexity, bits per byte): the
  corpus's first ``--items`` documents of templated sentences, whole.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from megatron_llama.data.corpus_gen import COLORS

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[1] / "data" / "corpus.jsonl"
COLOR_Q = "\nQ: What color are they? A:"
COUNT_Q = re.compile(r"^(?P<head>.*\nQ: How many \w+ does \w+ have\? A:) (?P<count>\d+)\.", re.S)


def story_items(corpus: Path, items: int) -> tuple[list[dict], list[dict]]:
    colors, counts = [], []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["kind"] != "story":
                continue
            text = doc["text"]
            head, _, rest = text.partition(COLOR_Q)
            color = rest.strip().split(".")[0]
            m = COUNT_Q.match(text)
            if not rest or color not in COLORS or m is None:
                raise ValueError(f"{corpus}: story {doc['id']} does not have the generator's form: regenerate it")
            colors.append({"id": doc["id"], "context": head + COLOR_Q, "choices": COLORS,
                           "gold": COLORS.index(color)})
            counts.append({"id": doc["id"], "question": m.group("head"), "answer": m.group("count")})
            if len(colors) == items:
                break
    return colors, counts


def sentence_docs(corpus: Path, items: int) -> list[dict]:
    out = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["kind"] == "sentences":
                out.append({"id": doc["id"], "text": doc["text"]})
                if len(out) == items:
                    break
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--items", type=int, default=200, help="stories per task")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    colors, counts = story_items(Path(args.corpus), args.items)
    write_jsonl(Path(args.out) / "story_color.jsonl", colors)
    write_jsonl(Path(args.out) / "story_count.jsonl", counts)
    sentences = sentence_docs(Path(args.corpus), args.items)
    write_jsonl(Path(args.out) / "corpus_sentences.jsonl", sentences)
    print(f"wrote {len(colors)} items each to {args.out}/story_color.jsonl, story_count.jsonl and "
          "corpus_sentences.jsonl")


if __name__ == "__main__":
    main()
