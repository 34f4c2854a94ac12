"""Model weights of a native (DeepSpeed) checkpoint: read them at any layout, write them at any layout.

What DeepSpeed 0.19.8 writes (checked by saving real engines; tests/test_convert_parity.py reads what they write):

* PP = 1 (``DeepSpeedEngine`` around ``LlamaModel``), ZeRO 0/1/2: ``mp_rank_{tp:02d}_model_states.pt``
  per TP rank (written by DP rank 0), ``"module"`` = that rank's state dict under global names
  (``layers.3.mlp.down.weight``).
* PP > 1 (``PipelineModule``): ``layer_{idx:02d}-model_{tp:02d}-model_states.pt`` per pipeline layer
  and TP rank, holding the layer's own state dict (``mlp.down.weight``), plus one
  ``mp_rank_{stage * tp + tp_rank:02d}_model_states.pt`` per (stage, TP rank) with ``"module": None``.
  Layer files do not depend on PP: the same files serve every PP size.
* megatron-core's linear layers add ``<module>._extra_state: None`` entries; a strict
  ``load_state_dict`` wants them back, so the writer adds them and the reader skips them.
* ZeRO-3 (PP = 1 only) keeps the weights in the optimizer partitions, not in the module files: not
  supported yet (refused with one line).

Reading is streamed: :meth:`NativeCheckpoint.layers` yields one pipeline layer's full (TP = 1)
tensors at a time (``layout.unshard`` of the TP shards), with files opened by
``torch.load(mmap=True)`` and dropped after each layer. :func:`write_native` takes such a stream and
writes the shards DeepSpeed loads (``engine.load_checkpoint(..., load_module_only=True)``) plus a
``run.json`` marked ``weights_only`` (step 0, no optimizer state): a run starts from it with
``train.init_from=PATH``.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from megatron_llama.config import ConfigError, ModelConfig, RunConfig, config_from_dict, config_to_dict
from megatron_llama.model.layout import shard, unshard

from .directory import LATEST, META
from .params import ParamInfo, check_key_set, param_table

# Local module names whose megatron-core layers carry an ``_extra_state`` entry.
_EXTRA_STATE = ("attention.qkv", "attention.proj", "mlp.gate_up", "mlp.down", "output")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (with ``run.json``), or a run directory whose ``latest`` names one."""
    p = Path(path)
    if (p / META).is_file():
        return p
    if (p / LATEST).is_file():
        tag = (p / LATEST).read_text().strip()
        if (p / tag / META).is_file():
            return p / tag
        raise ConfigError(f"{p}/latest names {tag!r}, which is not a complete checkpoint (no {tag}/{META}): "
                          "point at a step directory that has one")
    if not p.exists():
        raise ConfigError(f"{p} does not exist: pass a checkpoint directory (stepNNNNNNN/ with {META}) or a run "
                          "directory with a `latest` file")
    raise ConfigError(f"{p} is not a native checkpoint (no {META} and no `latest`): pass the step directory "
                      "written by mllama-train or mllama-convert")


def torch_load(path: Path, what: str):
    """``torch.load`` memory-mapped (nothing is read until used); damage is a ConfigError."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:  # DeepSpeed's mp_rank files hold configs, not only tensors
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError:
        raise ConfigError(f"{what}: shard {path.name} is missing from {path.parent}: the checkpoint is "
                          "incomplete; copy the whole directory again") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise ConfigError(f"{what}: {path} is damaged ({str(e).splitlines()[0][:120]}): copy it again or use "
                          "an older checkpoint") from None


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file(stage: int, tp_rank: int, tp: int) -> str:
    return f"mp_rank_{stage * tp + tp_rank:02d}_model_states.pt"


def pipeline_layers(cfg: ModelConfig) -> list[str]:
    """Global name of each pipeline layer, in order (``model.llama.layer_names``)."""
    return ["embedding"] + [f"layers.{i}" for i in range(cfg.num_layers)] + ["final_norm", "head"]


@dataclass
class NativeCheckpoint:
    """A native checkpoint opened for reading its model weights (nothing loaded yet).

    ``config``: the run's resolved config (``run.json``); ``tp``/``pp``/``dp``: its saved layout;
    ``per_layer_files``: PipelineModule layout (``layer_XX-model_YY``) or PP = 1 module files.
    """

    path: Path
    meta: dict
    config: RunConfig
    tp: int
    pp: int
    dp: int
    per_layer_files: bool

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def table(self) -> list[ParamInfo]:
        """Parameters at this checkpoint's TP (vocabulary padded for it)."""
        return param_table(self.model, self.tp)

    def rank_shard(self, layer: int, tp_rank: int) -> dict[str, torch.Tensor]:
        """Pipeline layer ``layer``'s tensors as TP rank ``tp_rank`` saved them: ``{global name: shard}``
        (shapes checked against the table; only that rank's file is opened)."""
        rows = [p for p in self.table if p.layer == layer]
        prefix = pipeline_layers(self.model)[layer] + "."
        r = tp_rank
        if self.per_layer_files:
            state = torch_load(self.path / layer_file(layer, r), str(self.path)) if rows else {}
            state = {prefix + k: v for k, v in state.items() if not k.endswith("._extra_state")}
        else:
            module = torch_load(self.path / mp_rank_file(0, r, self.tp), str(self.path)).get("module") or {}
            state = {k: v for k, v in module.items() if k.startswith(prefix) and not k.endswith("._extra_state")}
        check_key_set(set(state), {p.name for p in rows}, f"{self.path} (TP rank {r})")
        for p in rows:
            want = _local_shape(p, self.tp)
            if tuple(state[p.name].shape) != want:
                raise ConfigError(f"{self.path}: {p.name} of TP rank {r} has shape {tuple(state[p.name].shape)}"
                                  f", but the config in {META} says {want}: the files do not belong to this run")
        return state

    def layer_shards(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """Pipeline layer ``layer``'s tensors of every TP rank: ``[rank] -> {global name: shard}``."""
        return [self.rank_shard(layer, r) for r in range(self.tp)]

    def layer(self, layer: int, pad_for_tp: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Full (TP = 1) tensors of pipeline layer ``layer``; vocabulary rows padded for TP ``pad_for_tp``
        (default: this checkpoint's TP)."""
        shards = self.layer_shards(layer)
        rows = self.model.padded_vocab_size(pad_for_tp or self.tp)
        out = {}
        for p in self.table:
            if p.layer != layer:
                continue
            full = unshard([s[p.name] for s in shards], p.split)
            if p.vocab_rows:
                full = repad_vocab(full, rows)
            elif full.data_ptr() == shards[0][p.name].data_ptr():
                full = full.clone()  # not a view of the memory-mapped file (a cat already copied)
            out[p.name] = full
        return out

    def stored_dtypes(self) -> set[torch.dtype]:
        """The dtypes the module weights are saved in (TP rank 0's files; memory-mapped, no tensor
        data is read): what the run trained in, or what a conversion wrote."""
        if self.per_layer_files:
            files = [layer_file(i, 0) for i in sorted({p.layer for p in self.table})]
            states = [torch_load(self.path / f, str(self.path)) for f in files]
        else:
            states = [torch_load(self.path / mp_rank_file(0, 0, self.tp), str(self.path)).get("module") or {}]
        return {t.dtype for state in states for k, t in state.items()
                if torch.is_tensor(t) and not k.endswith("._extra_state")}

    def layers(self, pad_for_tp: Optional[int] = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(layer name, full tensors)`` for every pipeline layer in order, one layer in memory at a
        time; vocabulary rows padded for TP ``pad_for_tp`` (default: this checkpoint's TP)."""
        for i, name in enumerate(pipeline_layers(self.model)):
            yield name, self.layer(i, pad_for_tp)


def repad_vocab(full: torch.Tensor, rows: int) -> torch.Tensor:
    """A copy of a vocabulary-row tensor with exactly ``rows`` rows (padding rows are zero)."""
    if full.shape[0] >= rows:
        return full[:rows].clone()
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


def _local_shape(p: ParamInfo, tp: int) -> tuple[int, ...]:
    if p.split == "replicated" or tp == 1:
        return p.shape
    dim = 1 if p.split == "cols" else 0
    return tuple(n // tp if i == dim else n for i, n in enumerate(p.shape))


def open_native(path: str | os.PathLike) -> NativeCheckpoint:
    """Open a native checkpoint (step directory, or run directory with ``latest``) for reading weights.

    Raises ConfigError when it is not one, a shard file is missing, or it is a ZeRO-3 checkpoint.
    """
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / META).read_text())
        config = config_from_dict(meta["config"])
        layout = meta["layout"]
        tp, pp, dp = int(layout["tp"]), int(layout["pp"]), int(layout["dp"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{ckpt}/{META} is damaged or not ours ({e!s:.80}): use the run.json written with the "
                          "checkpoint") from None
    if meta.get("format") == "resharded":  # resharded.FORMAT (that module builds on this one)
        raise ConfigError(f"{ckpt} is a resharded store (fp32 masters and Adam moments, no module files): resume a "
                          "run from it (train.save_dir) or start one from its weights (train.init_from), then "
                          "convert or verify that run's checkpoint")
    if config.parallel.zero_stage == 3 and pp == 1 and not meta.get("weights_only"):
        raise ConfigError(f"{ckpt} was saved with ZeRO-3: its module files hold no weights and reading ZeRO-3 "
                          "partitions is not supported yet; train with parallel.zero_stage 1 or 2 to convert the run")
    per_layer = (ckpt / layer_file(0, 0)).is_file()
    expected = ([layer_file(p.layer, r) for p in param_table(config.model, tp) for r in range(tp)]
                if per_layer else [mp_rank_file(0, r, tp) for r in range(tp)])
    missing = sorted({f for f in expected if not (ckpt / f).is_file()})
    if missing:
        raise ConfigError(f"{ckpt} is incomplete: {len(missing)} shard file(s) missing, e.g. {missing[0]}; "
                          f"a TP{tp}·PP{pp} checkpoint needs them all: copy the whole directory again")
    return NativeCheckpoint(ckpt, meta, config, tp, pp, dp, per_layer)


# ----------------------------------------------------------------------------------------------
# writing


def _save(obj, path: Path) -> None:
    torch.save(obj, path)


def _layer_state(layer_name: str, rows: list[ParamInfo], full: dict[str, torch.Tensor], tp_rank: int, tp: int,
                 dtype: Optional[torch.dtype]) -> "OrderedDict[str, Optional[torch.Tensor]]":
    """One TP rank's state dict of one pipeline layer (local names, as its module's ``state_dict``)."""
    state: OrderedDict = OrderedDict()
    for p in rows:
        t = full[p.name]
        if tuple(t.shape) != p.shape:
            raise ConfigError(f"{p.name}: shape {tuple(t.shape)} disagrees with the config ({p.shape}): "
                              "the weights do not belong to this model shape")
        t = shard(t, p.split, tp_rank, tp)
        state[p.local] = (t.to(dtype) if dtype is not None else t).clone()  # clone: never save a view's storage
    modules = {p.local.rsplit(".", 1)[0] for p in rows} | ({"output"} if layer_name == "head" else set())
    for module in sorted(m for m in modules if m.endswith(_EXTRA_STATE)):
        state[module + "._extra_state"] = None
    return state


def _mp_state(module, param_rows: list[ParamInfo], pipe: bool, tp_rank: int, tp: int, pp: int, dp: int) -> dict:
    """The per-(stage, TP rank) ``mp_rank`` file: DeepSpeed's engine-level record (step 0, no optimizer)."""
    import deepspeed
    names = [p.pipe_name if pipe else p.name for p in param_rows]
    shapes = [OrderedDict((n, torch.Size(_local_shape(p, tp))) for n, p in zip(names, param_rows)
                          if len(p.shape) >= 2),
              OrderedDict((n, torch.Size(_local_shape(p, tp))) for n, p in zip(names, param_rows)
                          if len(p.shape) < 2)]
    return {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": shapes,
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(),
            "skipped_steps": 0, "global_steps": 0, "global_samples": 0, "dp_world_size": dp,
            "mp_world_size": tp * pp, "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
            "ds_config": None, "ds_version": deepspeed.__version__, "step": 0, "consumed_samples": 0}


def write_native(out: str | os.PathLike, config: RunConfig, layers: Iterable[tuple[str, dict[str, torch.Tensor]]],
                 tp: int, pp: int, boundaries: Optional[list[int]] = None, dtype: Optional[torch.dtype] = None,
                 source: str = "", on_layer=None) -> Path:
    """Write model weights as a weights-only native checkpoint directory ``out`` at TP ``tp`` x PP ``pp``.

    ``layers``: ``(layer name, full tensors)`` in pipeline order (what :meth:`NativeCheckpoint.layers`
    yields), global names, vocabulary padded for ``tp``; every parameter of ``param_table(config.model,
    tp)`` must come exactly once (strict). ``boundaries``: the PP stage boundaries over pipeline layers
    (``pipelines.balance.stage_boundaries``), needed for PP > 1. With PP > 1 one layer is in memory at a
    time; with PP = 1 DeepSpeed's format is one pickle per TP rank, so the whole model (all TP ranks'
    shards) is held until the end. ``on_layer(name, tensors)`` is called after each layer (progress).
    ``config.parallel`` is rewritten to the new layout in ``run.json``. ``out`` must not exist.
    """
    out = Path(out)
    model = config.model
    table = param_table(model, tp)
    names = pipeline_layers(model)
    pipe = pp > 1
    if pipe and (boundaries is None or len(boundaries) != pp + 1):
        raise ValueError("write_native: PP > 1 needs pp + 1 stage boundaries")
    out.mkdir(parents=True)
    seen: set[str] = set()
    module_states = [OrderedDict() for _ in range(tp)]
    # tied embeddings under PP: the head's layer file holds a copy of the embedding (pipelines/tied.py)
    copies = [p for p in table if p.pipe_copy] if pipe else []
    held: dict[str, torch.Tensor] = {}
    for name, full in layers:
        layer = names.index(name)
        rows = [p for p in table if p.layer == layer]
        check_key_set(set(full), {p.name for p in rows}, f"layer {name}")
        seen.update(full)
        held.update((p.name, full[p.name]) for p in copies if p.name in full)
        for r in range(tp):
            state = _layer_state(name, rows, full, r, tp, dtype)
            for p in copies:
                copy_layer, copy_local = p.pipe_copy.split(".", 1)
                if int(copy_layer) == layer:
                    t = shard(held[p.name], p.split, r, tp)
                    state[copy_local] = (t.to(dtype) if dtype is not None else t).clone()
            if pipe:
                _save(state, out / layer_file(layer, r))
            else:
                module_states[r].update((f"{name}.{k}", v) for k, v in state.items())
        if on_layer is not None:
            on_layer(name, full)
        del full
    check_key_set(seen, {p.name for p in table}, "converted weights")
    for r in range(tp):
        if pipe:
            for s in range(pp):
                rows = [p for p in table if boundaries[s] <= p.layer < boundaries[s + 1]]
                _save(_mp_state(None, rows, True, r, tp, pp, 1), out / mp_rank_file(s, r, tp))
        else:
            _save(_mp_state(module_states[r], table, False, r, tp, 1, 1), out / mp_rank_file(0, r, tp))
            module_states[r] = None
    tree = config_to_dict(config)
    tree["parallel"].update(tp=tp, pp=pp, dp=None)
    if tree["parallel"]["zero_stage"] > 1 and pp > 1:
        tree["parallel"]["zero_stage"] = 1
    meta = {"step": 0, "consumed_samples": 0, "weights_only": True, "source": source,
            "layout": {"tp": tp, "pp": pp, "dp": 1, "world_size": tp * pp}, "config": tree,
            "dtype": str(dtype or "as given").replace("torch.", "")}
    (out / META).write_text(json.dumps(meta, indent=2, default=str))
    return out
