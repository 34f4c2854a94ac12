"""Read the ZeRO optimizer state of a native checkpoint per parameter, as full TP = 1 tensors.

A native checkpoint (``stepN/`` written by training, see ``directory.py``) holds, for every
model-parallel rank ``mp = pp_stage * tp + tp_rank`` (DeepSpeed's numbering):

* ``mp_rank_{mp:02d}_model_states.pt``: ``param_shapes`` (per optimizer group, the ordered names
  and TP-shard shapes of this rank's parameters), the LR scheduler state, DeepSpeed's counters;
* ``zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` for every DP rank: that rank's slice of
  each group's flat fp32 master buffer and of the Adam moments over it, plus
  ``param_slice_mappings`` (per group, name -> ``(start, numel)`` of the piece of each parameter
  that falls into this DP rank's slice; ZeRO-1 and ZeRO-2 write the same format).

A parameter's TP shard is the concatenation, in DP rank order, of its pieces; its full tensor
is ``layout.unshard`` of its TP shards (replicated ones, e.g. norms, are taken from TP rank 0).
Vocabulary rows past ``vocab_size`` (TP padding) are dropped, so what comes out does not depend
on the layout it was saved with.

Streaming: files are opened with ``torch.load(mmap=True)`` afresh for every parameter, and one
parameter is assembled at a time. Names are the global names of ``params.py``.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_llama.config import ConfigError, RunConfig
from megatron_llama.config.load import config_from_dict
from megatron_llama.model.layout import unshard

from .directory import META
from .native_weights import resolve_checkpoint, torch_load
from .params import ParamInfo, param_table

MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
STATE_KEYS = (MASTER,) + MOMENTS


@dataclass
class NativeCheckpoint:
    """A complete native checkpoint directory and what its ``run.json`` says about it."""

    path: Path                 # the stepN directory
    meta: dict                 # run.json
    cfg: RunConfig             # the run's resolved config
    tp: int
    pp: int
    dp: int

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def consumed_samples(self) -> int:
        return int(self.meta["consumed_samples"])

    def model_file(self, mp: int) -> Path:
        return self.path / f"mp_rank_{mp:02d}_model_states.pt"

    def optim_file(self, dp: int, mp: int) -> Path:
        return self.path / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


def open_native(path: str | Path) -> NativeCheckpoint:
    """A run directory (its ``latest`` checkpoint) or a ``stepN`` directory; checks that every
    optimizer shard the layout needs is there. Raises ConfigError saying what is wrong."""
    p = resolve_checkpoint(path)
    try:
        meta = json.loads((p / META).read_text())
        layout, cfg = meta["layout"], config_from_dict(meta["config"])
        tp, pp, dp = int(layout["tp"]), int(layout["pp"]), int(layout["dp"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{p / META} is damaged or not ours ({type(e).__name__}: {e}): "
                          "pass a checkpoint written by mllama-train") from None
    if meta.get("format") == "resharded":
        raise ConfigError(f"{p} is a resharded store, not a native checkpoint: resume training from it "
                          "(train.save_dir) and reshard one of that run's checkpoints")
    if meta.get("weights_only"):
        raise ConfigError(f"{p} holds weights only (no optimizer state): start a run from it with "
                          "train.init_from, there is nothing to reshard")
    if cfg.parallel.zero_stage not in (1, 2):
        raise ConfigError(f"{p} was saved with parallel.zero_stage={cfg.parallel.zero_stage}: reading its optimizer "
                          "state (reshard, fp32 masters) is supported for ZeRO stage 1 and 2 checkpoints only")
    ckpt = NativeCheckpoint(p, meta, cfg, tp, pp, dp)
    missing = [f.name for mp in range(tp * pp)
               for f in [ckpt.model_file(mp)] + [ckpt.optim_file(d, mp) for d in range(dp)] if not f.is_file()]
    if missing:
        raise ConfigError(f"checkpoint {p} is incomplete: {len(missing)} shard(s) missing, e.g. "
                          f"{', '.join(missing[:3])}; use another checkpoint of the run")
    return ckpt


def _load(path: Path) -> dict:
    return torch_load(path, str(path.parent))


class _StageShards:
    """Every file of one pipeline stage (all TP x DP ranks), memory-mapped."""

    def __init__(self, ckpt: NativeCheckpoint, stage: int):
        self.ckpt = ckpt
        self.tp_ranks = []  # per TP rank: (name -> (group, shape), [per DP rank optimizer dict])
        for t in range(ckpt.tp):
            mp = stage * ckpt.tp + t
            model = _load(ckpt.model_file(mp))
            shapes = model.get("param_shapes")
            if not shapes:
                raise ConfigError(f"{ckpt.model_file(mp)} has no param_shapes (DeepSpeed metadata missing): "
                                  "it cannot be resharded")
            where = {name: (g, tuple(shape)) for g, group in enumerate(shapes) for name, shape in group.items()}
            optim = []
            for d in range(ckpt.dp):
                sd = _load(ckpt.optim_file(d, mp)).get("optimizer_state_dict", {})
                if "param_slice_mappings" not in sd or "base_optimizer_state" not in sd:
                    raise ConfigError(f"{ckpt.optim_file(d, mp)} has no ZeRO param_slice_mappings / optimizer "
                                      "state (saved without ZeRO stage 1 or 2?): it cannot be resharded")
                optim.append(sd)
            self.tp_ranks.append((where, optim, model))

    def names(self) -> list[str]:
        return list(self.tp_ranks[0][0])

    def shard(self, name: str, tp_rank: int, key: str) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard of ``name`` (master or a moment), fp32, its TP shape."""
        where, optim, _ = self.tp_ranks[tp_rank]
        if name not in where:
            raise ConfigError(f"{self.ckpt.path}: TP rank {tp_rank} has no parameter {name}")
        group, shape = where[name]
        pieces = []
        for d, sd in enumerate(optim):
            frag = sd["param_slice_mappings"][group].get(name)
            if frag is None:
                continue
            flat = (sd["single_partition_of_fp32_groups"][group] if key == MASTER
                    else sd["base_optimizer_state"]["state"][group][key])
            pieces.append(flat.detach().narrow(0, frag.start, frag.numel))  # masters are saved requiring grad
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        if out.numel() != torch.Size(shape).numel():
            raise ConfigError(f"{self.ckpt.path}: {name} has {out.numel()} elements in its ZeRO pieces, "
                              f"expected {tuple(shape)}: the checkpoint is damaged")
        return out.view(shape)


def _table_by_stage(ckpt: NativeCheckpoint) -> dict[str, ParamInfo]:
    """Name used inside the checkpoint -> parameter table row (PipelineModule names when PP > 1)."""
    table = param_table(ckpt.cfg.model, ckpt.tp)
    return {(p.pipe_name if ckpt.pp > 1 else p.name): p for p in table}


def _full_states(ckpt: NativeCheckpoint, shards: _StageShards, name: str, row: ParamInfo,
                 keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``{key: full fp32 tensor}`` of the parameter saved as ``name`` in this stage, padding dropped."""
    out = {}
    for key in keys:
        ranks = range(1 if row.split == "replicated" else ckpt.tp)
        full = unshard([shards.shard(name, t, key) for t in ranks], row.split)
        if tuple(full.shape) != row.shape:
            raise ConfigError(f"{ckpt.path}: {row.name} has shape {tuple(full.shape)}, the config "
                              f"says {row.shape}: the checkpoint does not match its run.json")
        out[key] = full[:ckpt.cfg.model.vocab_size] if row.vocab_rows else full
    return out


def _crc(states: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: zlib.crc32(memoryview(t.contiguous().numpy()).cast("B")) for k, t in states.items()}


def iter_param_states(ckpt: NativeCheckpoint, keys: tuple[str, ...] = STATE_KEYS
                      ) -> Iterator[tuple[ParamInfo, dict[str, torch.Tensor]]]:
    """``(row, {key: full fp32 tensor})`` for every parameter in pipeline order, vocabulary padding
    dropped. ``keys``: ``"fp32"`` (the master weights), ``"exp_avg"``, ``"exp_avg_sq"``.

    Tied embeddings under PP: the last stage's copy of the embedding (``pipe_copy``, a parameter
    of its own in that stage's optimizer) is not yielded; it must equal the embedding's master
    and moments bitwise (``pipelines/tied.py`` keeps them so), which is checked by CRC."""
    by_name = _table_by_stage(ckpt)
    copies = {p.pipe_copy: p for p in by_name.values() if p.pipe_copy} if ckpt.pp > 1 else {}
    order = {name: i for i, name in enumerate(by_name)}
    seen, tied_crc = set(), {}
    for stage in range(ckpt.pp):
        shards = _StageShards(ckpt, stage)
        for t in range(1, ckpt.tp):
            if set(shards.tp_ranks[t][0]) != set(shards.names()):
                raise ConfigError(f"{ckpt.path}: TP ranks of stage {stage} hold different parameters")
        unknown = [n for n in shards.names() if n not in by_name and n not in copies]
        if unknown:
            raise ConfigError(f"{ckpt.path}: unexpected tensor {unknown[0]} (not a parameter of "
                              f"{ckpt.cfg.model.name or 'this model'})")
        stage_copies = [n for n in shards.names() if n in copies]
        # DeepSpeed orders them by optimizer group; go in pipeline (table) order, one layer at a time
        by_layer: dict[int, list[str]] = {}
        for name in sorted((n for n in shards.names() if n in by_name), key=order.__getitem__):
            by_layer.setdefault(by_name[name].layer, []).append(name)
        for names in by_layer.values():
            for name in names:
                # mapped pages that were read stay resident (and count in RSS) until their file is
                # unmapped: map the files afresh per parameter, so at most one parameter's pages
                # are resident, whatever the depth of the stage or the size of a layer
                shards = shards or _StageShards(ckpt, stage)
                row = by_name[name]
                out = _full_states(ckpt, shards, name, row, keys)
                if row.pipe_copy in copies:
                    tied_crc[row.name] = _crc(out)
                seen.add(name)
                shards = None
                yield row, out
        for name in stage_copies:
            row = copies[name]
            if row.name not in tied_crc:
                raise ConfigError(f"{ckpt.path}: {name} (the LM head's copy of {row.name}) comes before the "
                                  "embedding itself: the checkpoint does not match its run.json")
            copy = _crc(_full_states(ckpt, shards or _StageShards(ckpt, stage), name, row, keys))
            shards = None
            diff = [k for k in keys if copy[k] != tied_crc[row.name][k]]
            if diff:
                raise ConfigError(f"{ckpt.path}: the LM head's copy {name} of the tied {row.name} differs from it "
                                  f"({', '.join(diff)}): the checkpoint is damaged; use another one of the run")
            seen.add(name)
    missing = sorted((set(by_name) | set(copies)) - seen)
    if missing:
        raise ConfigError(f"{ckpt.path}: missing {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}")


def read_trainer_state(ckpt: NativeCheckpoint) -> dict:
    """Everything besides the tensors that a resumed run needs (JSON-serialisable): the optimizer's
    step count, its param-group hyper-parameters, the LR scheduler state, DeepSpeed's counters."""
    model = _load(ckpt.model_file(0))
    optim = _load(ckpt.optim_file(0, 0))["optimizer_state_dict"]["base_optimizer_state"]
    steps = set()
    for stage in range(ckpt.pp):
        for t in range(ckpt.tp):
            for d in range(ckpt.dp):
                sd = _load(ckpt.optim_file(d, stage * ckpt.tp + t))["optimizer_state_dict"]
                steps |= {int(s["step"]) for s in sd["base_optimizer_state"]["state"].values()}
    if len(steps) != 1:
        raise ConfigError(f"{ckpt.path}: optimizer step counts disagree across shards ({sorted(steps)}): "
                          "the checkpoint is damaged")
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in optim["param_groups"]]
    return {"optimizer_step": steps.pop(), "param_groups": groups,
            "lr_scheduler": model.get("lr_scheduler"), "global_steps": int(model.get("global_steps", ckpt.step)),
            "global_samples": int(model.get("global_samples", ckpt.consumed_samples)),
            "skipped_steps": int(model.get("skipped_steps", 0))}


def optimizer_step(ckpt_dir: str | Path) -> int:
    """The Adam step count stored in a native checkpoint (tests, ``inspect``)."""
    return read_trainer_state(open_native(ckpt_dir))["optimizer_step"]


def master_layers(ckpt, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(pipeline layer name, {global name: full fp32 master, cast to dtype})`` for every pipeline
    layer in order (empty dict for a layer without parameters, e.g. a tied head), one layer in
    memory at a time; vocabulary rows padded (zeros) for the checkpoint's TP, like the module
    weights that ``native_weights`` reads. ``ckpt``: a path or anything with a ``path``."""
    native = open_native(getattr(ckpt, "path", ckpt))
    model = native.cfg.model
    padded = model.padded_vocab_size(native.tp)
    names = ["embedding"] + [f"layers.{i}" for i in range(model.num_layers)] + ["final_norm", "head"]
    it = iter_param_states(native, keys=(MASTER,))
    pending = next(it, None)
    for i, layer_name in enumerate(names):
        out = {}
        while pending is not None and pending[0].layer == i:
            row, states = pending
            t = states[MASTER]
            if row.vocab_rows and t.shape[0] < padded:
                t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
            out[row.name] = t.to(dtype) if dtype is not None else t
            pending = next(it, None)
        yield layer_name, out
