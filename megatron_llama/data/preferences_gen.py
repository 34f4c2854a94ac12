"""The embedded preference set (``data/preferences.jsonl``), built from the instruction set.

One pair per record of ``data/instructions.jsonl``: the conversation up to its last question,
``chosen`` = the record's own (right) answer, ``rejected`` = a plausible wrong one: the last answer
of another record whose last question is of the same kind (another animal's sound, another
word's opposite, another count...), never equal to the right one. Prompt/response records stay
``{"prompt", "chosen", "rejected"}`` with string sides; chat records become ``{"messages",
"chosen", "rejected"}`` with assistant turns, so both accepted shapes occur. Deterministic:
``random.Random(seed)``; ``python data/generate.py`` rewrites it byte for byte.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Iterator

_ROOT = Path(__file__).resolve().parents[2] / "data"
# the question kinds of instructions_gen.py, recognised by their wording
KINDS = {"sound": re.compile(r"^What sound does"), "opposite": re.compile(r"^What is the opposite of"),
         "color": re.compile(r"^What color is"), "repeat": re.compile(r"^Repeat after me"),
         "count": re.compile(r" has \d+ .*How many")}


def kind_of(question: str) -> str:
    for name, pattern in KINDS.items():
        if pattern.search(question):
            return name
    raise ValueError(f"question of no known kind: {question!r}")


def _last_turn(record: dict) -> tuple[list, str, str]:
    """(messages before the last answer, last question, last answer) of an instruction record."""
    if "messages" in record:
        m = record["messages"]
        return m[:-1], m[-2]["content"], m[-1]["content"]
    return [{"role": "user", "content": record["prompt"]}], record["prompt"], record["response"]


def generate(instructions: list[dict], seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    answers: dict[str, list[str]] = {}
    turns = [_last_turn(r) for r in instructions]
    for _, question, answer in turns:
        answers.setdefault(kind_of(question), []).append(answer)
    for record, (context, question, right) in zip(instructions, turns):
        pool = answers[kind_of(question)]
        wrong = right
        while wrong == right:  # every kind has many distinct answers
            wrong = pool[rng.randrange(len(pool))]
        if "messages" in record:
            yield {"id": record["id"], "messages": context, "chosen": {"role": "assistant", "content": right},
                   "rejected": {"role": "assistant", "content": wrong}}
        else:
            yield {"id": record["id"], "prompt": question, "chosen": right, "rejected": wrong}


def write(path: str | Path, instructions: str | Path = _ROOT / "instructions.jsonl", seed: int = 0) -> Path:
    path = Path(path)
    with open(instructions, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in generate(records, seed):
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", default=str(_ROOT / "instructions.jsonl"))
    ap.add_argument("--output", default=str(_ROOT / "preferences.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"wrote {write(args.output, args.instructions, args.seed)}")


if __name__ == "__main__":
    main()
