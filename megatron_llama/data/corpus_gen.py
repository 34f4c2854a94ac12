"""The embedded default corpus (``data/corpus.jsonl``): deterministic, small, learnable.

Structure a tiny model visibly picks up in a few hundred steps, so the quickstart's loss curve
means something: addition and subtraction facts, counting runs, templated sentences with a
small vocabulary, and question/answer pairs whose answer is in the question. Written by
``python data/generate.py`` (or ``python -m megatron_llama.data.corpus_gen``); the same seed
gives the same bytes on every machine (``random.Random`` with an int seed is stable).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterator

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
ANIMALS = ["cat", "dog", "fox", "bird", "horse", "mouse", "rabbit", "cow", "duck", "bear"]
VERBS = ["sees", "chases", "likes", "follows", "finds", "watches"]
PLACES = ["garden", "forest", "house", "river", "field", "barn", "hill", "road"]
NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"]


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 14)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            lines.append(f"{a} + {b} = {a + b}")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} - {b} = {a - b}")
    return "\n".join(lines)


def _counting(rng: random.Random) -> str:
    start, step = rng.randint(0, 200), rng.choice([1, 1, 1, 2, 5, 10])
    n = rng.randint(8, 20)
    numbers = " ".join(str(start + step * k) for k in range(n))
    return f"Counting from {start} by {step}: {numbers}."


def _sentences(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(3, 7)):
        c1, a1, v, c2, a2, p = (rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(VERBS),
                                rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(PLACES))
        out.append(f"The {c1} {a1} {v} the {c2} {a2} in the {p}.")
    return " ".join(out)


def _story(rng: random.Random) -> str:
    name, animal, color, place = (rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(COLORS),
                                  rng.choice(PLACES))
    count = rng.randint(2, 9)
    return (f"{name} has {count} {color} {animal}s. Every morning {name} takes the {animal}s to "
            f"the {place}.\nQ: How many {animal}s does {name} have? A: {count}.\n"
            f"Q: What color are they? A: {color}.\nQ: Where do they go? A: the {place}.")


KINDS = [_arithmetic, _counting, _sentences, _story]


def generate(seed: int = 0, target_bytes: int = 1_500_000) -> Iterator[dict]:
    """Documents ``{"id", "kind", "text"}`` until about ``target_bytes`` of JSONL."""
    rng = random.Random(seed)
    size, i = 0, 0
    while size < target_bytes:
        kind = rng.choice(KINDS)
        doc = {"id": i, "kind": kind.__name__.strip("_"), "text": kind(rng)}
        size += len(json.dumps(doc)) + 1
        i += 1
        yield doc


def write(path: str | Path, seed: int = 0, target_bytes: int = 1_500_000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for doc in generate(seed, target_bytes):
            f.write(json.dumps(doc) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(Path(__file__).resolve().parents[2] / "data" / "corpus.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes", type=int, default=1_500_000, help="approximate size of the JSONL")
    args = ap.parse_args(argv)
    print(f"wrote {write(args.output, args.seed, args.bytes)}")


if __name__ == "__main__":
    main()
