"""YAML + ``key=value`` overrides -> a validated RunConfig, and back to plain dicts.

A run file looks like::

    model: {preset: tiny, vocab_size: 1024}   # or just `model: tiny`
    parallel: {tp: 2, pp: 2}
    train: {steps: 200, lr: 1e-3}
    data: {corpus: data/corpus.jsonl}

Overrides address fields by dotted path: ``train.lr=1e-3 parallel.tp=2 model.preset=llama-7b``.
Every error is a ConfigError whose message names the field and the fix.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .dpo import DPOConfig
from .errors import ConfigError
from .model import ModelConfig
from .presets import preset
from .run import DataConfig, ParallelConfig, RunConfig, TrainConfig

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig,
            "dpo": DPOConfig}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one YAML or command-line value to the dataclass field's type."""
    origin = typing.get_origin(typ)
    if origin is Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typ is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    return value


def _build(cls, section: str, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}: valid keys are {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"override {dotted}=...: write SECTION.KEY=VALUE with SECTION one of "
                          f"{', '.join(SECTIONS)} (e.g. train.lr=1e-3)")
    section, key = parts
    node = tree.setdefault(section, {})
    if isinstance(node, str):  # `model: tiny` shorthand
        node = tree[section] = {"preset": node}
    node[key] = yaml.safe_load(raw) if raw != "" else ""


def config_from_dict(tree: dict) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (a parsed YAML file)."""
    unknown = set(tree) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}: "
                          f"a run file has only {', '.join(SECTIONS)}")
    model_tree = tree.get("model")
    if model_tree is None:
        raise ConfigError("the run has no model: add `model: <preset>` or a model section")
    if isinstance(model_tree, str):
        model_tree = {"preset": model_tree}
    model_tree = dict(model_tree)
    name = model_tree.pop("preset", None)
    if name is not None:
        hints = typing.get_type_hints(ModelConfig)
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in model_tree:
            if key not in fields:
                raise ConfigError(f"unknown key model.{key}: valid keys are {', '.join(sorted(fields))}")
        model = preset(str(name), **{k: _coerce(v, hints[k], f"model.{k}") for k, v in model_tree.items()})
    else:
        model = _build(ModelConfig, "model", model_tree)
    sections = {s: _build(cls, s, tree.get(s) or {}) for s, cls in SECTIONS.items() if s != "model"}
    return RunConfig(model=model, **sections)


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML (or start empty when path is None) and apply ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: pass a YAML from configs/")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must be a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} has no '=': write SECTION.KEY=VALUE")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    return config_from_dict(tree)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict of a RunConfig (written next to every checkpoint)."""
    return dataclasses.asdict(cfg)
