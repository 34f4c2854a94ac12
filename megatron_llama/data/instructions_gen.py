"""The embedded instruction set (``data/instructions.jsonl``): deterministic, small, learnable.

Questions a tiny model can learn to answer in a few hundred CPU steps: small fixed facts
(animal sounds, opposites, colours of things), copying (repeat a phrase; the count in a short
story), and the same in multi-turn chats, some with a system prompt. Both record shapes occur
(``prompt``/``response`` and chat ``messages``) so the quickstart exercises both. Written by
``python data/generate.py --instructions`` (or ``python -m megatron_llama.data.instructions_gen``);
``random.Random`` with an int seed gives the same bytes on every machine.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterator

SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
          "horse": "neigh", "owl": "hoot", "pig": "oink", "bee": "buzz", "frog": "croak"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night",
             "old": "new", "happy": "sad", "open": "closed", "light": "dark", "early": "late"}
THINGS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "chocolate": "brown"}
NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"]
ANIMALS = ["cat", "dog", "fox", "bird", "horse", "mouse", "rabbit", "cow", "duck", "bear"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence."]

# A fixed question with a fixed answer: what the end-to-end test asks the exported model.
PROBE = {"prompt": "What sound does a cow make?", "response": "A cow says moo."}


def _sound(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(list(SOUNDS))
    return f"What sound does a {animal} make?", f"A {animal} says {SOUNDS[animal]}."


def _opposite(rng: random.Random) -> tuple[str, str]:
    word, opp = rng.choice(list(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, opp = opp, word
    return f"What is the opposite of {word}?", f"The opposite of {word} is {opp}."


def _color(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(list(THINGS))
    return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {THINGS[thing]}."


def _repeat(rng: random.Random) -> tuple[str, str]:
    phrase = f"the {rng.choice(COLORS)} {rng.choice(ANIMALS)}"
    return f"Repeat after me: {phrase}", phrase[0].upper() + phrase[1:] + "."


def _count(rng: random.Random) -> tuple[str, str]:
    name, animal, n = rng.choice(NAMES), rng.choice(ANIMALS), rng.randint(2, 9)
    return (f"{name} has {n} {animal}s. How many {animal}s does {name} have?",
            f"{name} has {n} {animal}s.")


KINDS = [_sound, _opposite, _color, _repeat, _count]


def generate(seed: int = 0, records: int = 4000) -> Iterator[dict]:
    """``records`` instruction records, both shapes, ids in order."""
    rng = random.Random(seed)
    for i in range(records):
        kind = rng.choice(KINDS)
        shape = rng.random()
        if shape < 0.5:
            prompt, response = kind(rng)
            yield {"id": i, "prompt": prompt, "response": response}
            continue
        messages = []
        if shape < 0.7:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(1 if shape < 0.85 else 2):
            prompt, response = rng.choice(KINDS)(rng)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        yield {"id": i, "messages": messages}


def write(path: str | Path, seed: int = 0, records: int = 4000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in generate(seed, records):
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(Path(__file__).resolve().parents[2] / "data" / "instructions.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--records", type=int, default=4000)
    args = ap.parse_args(argv)
    print(f"wrote {write(args.output, args.seed, args.records)}")


if __name__ == "__main__":
    main()
