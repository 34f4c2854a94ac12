"""The resharded store: a layout-free checkpoint that a run at any TP x PP x DP resumes from.

``mllama-convert reshard`` writes it as an ordinary checkpoint directory of a run (``stepN/``
with ``run.json``, ``latest``), so the new run simply uses ``train.save_dir=OUT``::

    stepN/run.json                 "format": "resharded", the NEW layout, step, consumed samples
    stepN/trainer_state.json       Adam step count, param-group hyper-parameters, LR scheduler
    stepN/layer_LLL.safetensors    per pipeline layer, for each parameter (global name, full
                                   TP = 1 shape, vocabulary unpadded, fp32):
                                   ``fp32/<name>``, ``exp_avg/<name>``, ``exp_avg_sq/<name>``

Loading (:func:`load_into_engine`, every rank of the new run, called by ``formats.resume``):
each rank builds the optimizer state that torch's Adam would have after ``step`` steps, then
sets the slices it owns through DeepSpeed's public ``safe_set_full_fp32_param`` /
``safe_set_full_optimizer_state`` (which know where ZeRO-1/2 put each parameter's piece on
this DP rank), copies the module weights, and restores the LR scheduler. Vocabulary rows
beyond ``vocab_size`` are re-padded with zeros (weights and moments) for the new TP size.
The run's next checkpoint is a native one again.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_llama.config import ConfigError
from megatron_llama.model.layout import shard

from . import integrity
from .directory import META, latest
from .optimizer_state import MASTER, STATE_KEYS, iter_param_states, open_native
from .params import param_index, pipeline_names

FORMAT = "resharded"
TRAINER_STATE = "trainer_state.json"


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def store_key(key: str, name: str) -> str:
    return f"{key}/{name}"


def _adam_state(optimizer, step: int) -> None:
    """Give every flat fp32 partition the state torch's Adam(W) keeps (zeros for now), so that
    DeepSpeed's fragment views can be linked to it before the first step."""
    base = optimizer.optimizer  # the client torch optimizer inside DeepSpeed's ZeRO wrapper
    for group in base.param_groups:
        if group.get("amsgrad"):
            raise ConfigError("resuming a resharded checkpoint with amsgrad is not supported")
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            base.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32,
                                                  device=p.device if on_device else "cpu"),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    # DeepSpeed links each parameter's fragment to the optimizer state lazily, after the first
    # step; link it now to the state made above (the same call its universal-checkpoint loader makes).
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def _global_names(module, pipelined: bool, cfg_model, tp: int) -> dict[str, str]:
    """Local parameter name -> global name (PipelineModule names are ``{layer}.{local}``; a tied
    head's copy of the embedding maps to the embedding, whose master and moments it gets)."""
    index = param_index(cfg_model, tp)
    by_pipe = {name: p.name for name, p in pipeline_names(cfg_model, tp).items()}
    out = {}
    for local, _ in module.named_parameters():
        name = by_pipe.get(local) if pipelined else (local if local in index else None)
        if name is None:
            raise ConfigError(f"model parameter {local} is not in the parameter table")
        out[local] = name
    return out


@torch.no_grad()
def load_into_engine(engine, layout, step_dir: Path, info: dict) -> tuple[int, int]:
    """Set this rank's model weights, fp32 masters, Adam moments and step count, and the LR
    scheduler, from a resharded store; returns ``(step, consumed_samples)``.

    ``engine`` is ``pipelines.engine.TrainEngine`` (duck-typed: the library does not import it).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    cfg = engine.cfg
    state = json.loads((step_dir / TRAINER_STATE).read_text())
    ds, optimizer = engine.engine, engine.optimizer
    if not hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        raise ConfigError(f"resuming the resharded checkpoint {step_dir} needs ZeRO stage 1 or 2 "
                          f"(parallel.zero_stage={cfg.parallel.zero_stage}): set parallel.zero_stage=1")
    _adam_state(optimizer, state["optimizer_step"])
    module = ds.module
    names = _global_names(module, engine.pipelined, cfg.model, layout.tp)
    rows = param_index(cfg.model, layout.tp)
    files = {}
    try:
        for local, param in module.named_parameters():
            row = rows[names[local]]
            path = step_dir / layer_file(row.layer)
            if path not in files:
                if not path.is_file():
                    raise ConfigError(f"resharded checkpoint {step_dir} has no {path.name}: reshard again")
                files[path] = safe_open(str(path), framework="pt")
            f = files[path]
            for key in STATE_KEYS:
                k = store_key(key, row.name)
                if k not in f.keys():
                    raise ConfigError(f"resharded checkpoint {step_dir}: {path.name} has no tensor {k}")
                full = f.get_tensor(k)
                if row.vocab_rows and full.shape[0] < row.shape[0]:  # re-pad for this TP size
                    full = torch.cat([full, full.new_zeros(row.shape[0] - full.shape[0], *full.shape[1:])])
                if tuple(full.shape) != row.shape:
                    raise ConfigError(f"resharded checkpoint {step_dir}: {k} has shape {tuple(full.shape)}, "
                                      f"this run's model needs {row.shape}: check model.* against the checkpoint")
                piece = shard(full, row.split, layout.tp_rank, layout.tp).to(param.device)
                if key == MASTER:
                    safe_set_full_fp32_param(param, piece)
                    param.data.copy_(piece.to(param.dtype))
                else:
                    safe_set_full_optimizer_state(param, piece, key)
            if not hasattr(param, "_hp_mapping"):
                raise ConfigError(f"parameter {row.name} is not managed by a ZeRO optimizer: set parallel.zero_stage=1")
    finally:
        files.clear()
    _restore_schedule(engine, state)
    _note_batch_change(cfg, layout, info)
    ds.global_steps = state["global_steps"]
    ds.global_samples = state["global_samples"]
    ds.skipped_steps = state["skipped_steps"]
    return int(info["step"]), int(info["consumed_samples"])


def _note_batch_change(cfg, layout, info: dict) -> None:
    """A different global batch is allowed (the sample stream stays defined by the consumed
    samples) but it is no longer the uninterrupted run's: say so once."""
    t = info.get("config", {}).get("train", {})
    saved = t.get("global_batch_size") or 0
    now = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * layout.dp
    if saved and saved != now and layout.rank == 0:
        print(f"note: the checkpoint was trained with a global batch of {saved} sequences, this run uses {now}; "
              f"set train.grad_accum_steps={max(1, saved // (cfg.train.micro_batch_size * layout.dp))} to keep it",
              flush=True)


def _restore_schedule(engine, state: dict) -> None:
    """Param-group hyper-parameters (lr, betas, ...) and the LR scheduler as they were saved."""
    groups = engine.optimizer.optimizer.param_groups
    if len(groups) != len(state["param_groups"]):
        raise ConfigError(f"the run has {len(groups)} optimizer groups, the checkpoint {len(state['param_groups'])}")
    for group, saved in zip(groups, state["param_groups"]):
        for k, v in saved.items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    if state.get("lr_scheduler") is not None and engine.scheduler is not None:
        engine.scheduler.load_state_dict(state["lr_scheduler"])


def is_resharded(info: dict) -> bool:
    return info.get("format") == FORMAT


def _store_shape(row, vocab: int) -> tuple[int, ...]:
    return (vocab,) + row.shape[1:] if row.vocab_rows else row.shape


class _LayerWriter:
    """One ``layer_LLL.safetensors`` written tensor by tensor: the header is known up front from
    the parameter table, so no more than one parameter is ever held (safetensors' own
    ``save_file`` would first copy the whole layer into bytes)."""

    def __init__(self, path: Path, rows, vocab: int):
        entries, offset, self.order = {}, 0, []
        for row in rows:
            shape = _store_shape(row, vocab)
            nbytes = 4 * math.prod(shape)
            for key in STATE_KEYS:
                entries[store_key(key, row.name)] = {"dtype": "F32", "shape": list(shape),
                                                     "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            self.order.append(row.name)
        entries["__metadata__"] = {"format": "pt"}
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(header)) + header)

    def write(self, row, states: dict[str, torch.Tensor]) -> None:
        if not self.order or self.order.pop(0) != row.name:
            raise RuntimeError(f"{row.name} arrived out of pipeline order")
        for key in STATE_KEYS:
            self.file.write(states[key].contiguous().numpy().data)

    def close(self) -> None:
        if self.order:
            raise RuntimeError(f"layer file incomplete: {self.order[0]} was never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def write_store(ckpt, step_dir: Path, meta: dict, on_param=None) -> None:
    """Write the store of native checkpoint ``ckpt`` into ``step_dir`` (which must exist), one
    parameter in memory at a time; ``meta`` is the new ``run.json`` (written last).
    ``on_param(name, nbytes)`` is called after each parameter (progress bars)."""
    from .optimizer_state import read_trainer_state
    from .params import param_table

    (step_dir / TRAINER_STATE).write_text(json.dumps(read_trainer_state(ckpt), indent=2))
    vocab = ckpt.cfg.model.vocab_size
    by_layer: dict[int, list] = {}
    for row in param_table(ckpt.cfg.model, ckpt.tp):
        by_layer.setdefault(row.layer, []).append(row)
    writer, layer = None, None
    try:
        for row, states in iter_param_states(ckpt):
            if row.layer != layer:
                if writer is not None:
                    writer.close()
                layer = row.layer
                writer = _LayerWriter(step_dir / layer_file(layer), by_layer[layer], vocab)
            writer.write(row, states)
            if on_param is not None:
                on_param(row.name, sum(t.numel() * t.element_size() for t in states.values()))
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.file.close()
    # the source's file table describes other files: list this checkpoint's own (integrity.py)
    files = integrity.manifest(step_dir, collective=False)
    (step_dir / META).write_text(json.dumps(dict(meta, format=FORMAT, files=files), indent=2, default=str))


def iter_store_masters(step_dir: Path):
    """``(global name, full fp32 master)`` from a resharded store, in pipeline order."""
    from safetensors import safe_open

    from megatron_llama.config.load import config_from_dict

    from .params import param_table

    cfg = config_from_dict(json.loads((step_dir / META).read_text())["config"])
    opened = {}
    for row in param_table(cfg.model, 1):
        if row.layer not in opened:
            opened.clear()  # one layer file open at a time
            opened[row.layer] = safe_open(str(step_dir / layer_file(row.layer)), framework="pt")
        yield row.name, opened[row.layer].get_tensor(store_key(MASTER, row.name))


def resharded_step_dir(path: str | Path) -> Optional[Path]:
    """The ``stepN/`` of a resharded store that ``path`` (a run directory: its newest checkpoint,
    or a ``stepN/``) names, or None when it is not one."""
    p = Path(path)
    if not (p / META).is_file():
        info = latest(str(p))
        if info is None:
            return None
        p = p / info["tag"]
    try:
        return p if is_resharded(json.loads((p / META).read_text())) else None
    except (OSError, ValueError):
        return None


def iter_fp32_masters(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(global name, full fp32 master weight)`` of every parameter, one at a time, in pipeline
    order, vocabulary padding dropped. ``ckpt_dir``: a run directory (newest checkpoint) or a
    ``stepN/``, native (its ZeRO optimizer files) or a resharded store (stored as they are)."""
    step_dir = resharded_step_dir(ckpt_dir)
    if step_dir is not None:
        yield from iter_store_masters(step_dir)
        return
    for row, states in iter_param_states(open_native(ckpt_dir), keys=(MASTER,)):
        yield row.name, states[MASTER]
