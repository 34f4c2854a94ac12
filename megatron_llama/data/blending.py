"""Several corpora mixed by weight, with LLaMA's epoch semantics.

LLaMA (Touvron et al. 2023, table 1) gives each corpus a *sampling proportion* and reports how
many *epochs* of it that means (Wikipedia 2.45, Books 2.23, GitHub 0.64 ...). Here:

* ``weight`` is the sampling proportion (normalised over the sources);
* one "blend epoch" has N windows, corpus i contributing ``weight_i * N`` of them, i.e.
  ``epochs_i = weight_i * N / windows_i``;
* N is, by default, the smallest length in which every corpus is seen at least once (the one
  with the fewest windows per unit of weight exactly once, the others more: a small corpus
  with a large weight repeats), or is fixed by ``epochs`` on a source (``epochs: 0.5`` to
  see half of a huge corpus; sources giving epochs must agree on N).

Each corpus is a megatron-core GPTDataset holding enough epochs (each with its own document
shuffle); megatron-core's BlendedDataset interleaves them by weight (its C++ helper picks,
at every position, the source furthest below its target share).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset

from ..config.errors import ConfigError

SURPLUS = 0.005  # extra windows built per source: the greedy interleave can overshoot by a few


@dataclass
class SourceSpec:
    path: str
    weight: float
    epochs: Optional[float] = None


def _number(value: Any, where: str, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what} {value!r} is not a number: write e.g. "
                          "{path: data/web, weight: 0.7}") from None
    if not math.isfinite(x) or x <= 0:
        raise ConfigError(f"{where}: {what} must be a positive number, got {value!r}")
    return x


def parse_sources(sources: Any) -> list[SourceSpec]:
    """``data.sources`` -> specs. Accepts a list of ``{path, weight, epochs?}`` dicts, or
    Megatron's ``--data-path`` string form ``"0.3 data/web 0.7 data/books"`` (a list of
    ``"WEIGHT PATH"`` strings too); a single source may omit its weight."""
    if isinstance(sources, str):
        words = sources.split()
        if len(words) > 1 and len(words) % 2:
            raise ConfigError(f"data.sources={sources!r} does not parse: write \"WEIGHT PATH\" pairs, "
                              "e.g. \"0.3 data/web 0.7 data/books\"")
        sources = words if len(words) == 1 else [" ".join(words[i:i + 2]) for i in range(0, len(words), 2)]
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"data.sources must be a non-empty list of {{path, weight}}, got {sources!r}")
    specs = []
    for i, item in enumerate(sources):
        where = f"data.sources[{i}]"
        if isinstance(item, str):
            words = item.split()
            if len(words) == 1:
                item = {"path": words[0]}
            elif len(words) == 2:
                item = {"weight": words[0], "path": words[1]}
            else:
                raise ConfigError(f"{where}: {item!r} does not parse: write \"WEIGHT PATH\" pairs, "
                                  "e.g. \"0.3 data/web 0.7 data/books\"")
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected {{path, weight, epochs?}}, got {item!r}")
        unknown = set(item) - {"path", "weight", "epochs"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}: a source has "
                              "path, weight and optionally epochs")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise ConfigError(f"{where}: no path: give the .bin/.idx prefix, e.g. path: data/web")
        if "weight" not in item and len(sources) > 1:
            raise ConfigError(f"{where} ({item['path']}): no weight: every source of a blend needs "
                              "one, e.g. weight: 0.3")
        weight = _number(item.get("weight", 1.0), where, "weight")
        epochs = _number(item["epochs"], where, "epochs") if item.get("epochs") is not None else None
        specs.append(SourceSpec(item["path"], weight, epochs))
    return specs


def plan_blend(specs: list[SourceSpec], windows: list[int]) -> tuple[list[float], int]:
    """(normalised weights, blend length N) for sources holding ``windows[i]`` windows each."""
    total = sum(s.weight for s in specs)
    weights = [s.weight / total for s in specs]
    fixed = {s.path: s.epochs * n / w for s, n, w in zip(specs, windows, weights) if s.epochs}
    if fixed:
        lo, hi = min(fixed.values()), max(fixed.values())
        if hi > lo * 1.02:
            implied = ", ".join(f"{p}: {v:,.0f}" for p, v in fixed.items())
            raise ConfigError(f"data.sources: the epochs given imply different blend lengths "
                              f"({implied} windows): set epochs on one source only, or make "
                              "weights proportional to epochs x corpus size")
        length = math.ceil(hi)
    else:
        length = math.ceil(max(n / w for n, w in zip(windows, weights)))
    return weights, max(1, length)


def samples_per_source(weights: list[float], length: int) -> list[int]:
    """Windows to build per source: its share of N plus a small surplus for the interleave."""
    return [math.ceil(w * length * (1 + SURPLUS)) + 1 for w in weights]


def blend(datasets: list[GPTDataset], weights: list[float], length: int,
          cache_dir: str) -> BlendedDataset:
    """megatron-core's BlendedDataset over ``datasets`` (which must already hold enough windows)."""
    # With torch.distributed up, cache the interleave on disk (rank 0 writes, the others map
    # it); without it, megatron-core's cache path needs a process group, so build in memory.
    cache = cache_dir if torch.distributed.is_initialized() else None
    base = datasets[0].config
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    config = type(base)(**{**fields, "path_to_cache": cache})
    return BlendedDataset(datasets, weights, length, config)
