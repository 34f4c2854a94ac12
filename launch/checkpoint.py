"""Save at the end of training (and every ``train.save_interval`` steps) and resume from ``latest``.

Layout under ``train.save_dir``::

    step0000200/           DeepSpeed checkpoint (model states per TP x PP rank, ZeRO shards)
    step0000200/run.json   resolved config, layout, step, consumed samples, last loss, versions
    latest                 name of the newest complete checkpoint (DeepSpeed writes it last)

``run.json`` is written by rank 0 after every rank has finished writing (barrier), and a resume
reads a checkpoint only if its ``run.json`` exists, so a half-written directory is never loaded.
A checkpoint can only be resumed with the same TP, PP and DP (DeepSpeed does not reshard); the
error says so. Hardening (SIGTERM saves, timed saves, atomic renames) belongs to a later issue.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_llama.config import ConfigError, config_to_dict

META = "run.json"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def save(engine, cfg, layout, save_dir: str, step: int, consumed_samples: int, last_loss: float) -> Path:
    """Write a checkpoint of ``step`` on all ranks; returns its directory."""
    tag = tag_for(step)
    state = {"step": step, "consumed_samples": consumed_samples}
    engine.save(save_dir, tag, state)
    dist.barrier()
    path = Path(save_dir) / tag
    if dist.get_rank() == 0:
        import deepspeed
        import megatron.core
        import torch
        meta = {"step": step, "consumed_samples": consumed_samples, "last_loss": last_loss,
                "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size},
                "config": config_to_dict(cfg), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                             "megatron-core": getattr(megatron.core, "__version__", "?")}}
        tmp = path / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path / META)
        _prune(Path(save_dir), cfg.train.keep_last, keep=tag)
    dist.barrier()
    return path


def _prune(root: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p for p in root.glob("step*") if p.is_dir() and (p / META).exists())
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def latest(save_dir: str) -> Optional[dict]:
    """Metadata of the newest complete checkpoint in ``save_dir``, or None."""
    root = Path(save_dir)
    marker = root / "latest"
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    meta = root / tag / META
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    info["tag"] = tag
    return info


def resume(engine, layout, save_dir: str) -> tuple[int, int]:
    """Load ``latest`` if there is one: returns ``(step, consumed_samples)``, or ``(0, 0)``."""
    info = latest(save_dir)
    if info is None:
        return 0, 0
    saved = info["layout"]
    if (saved["tp"], saved["pp"], saved["dp"]) != (layout.tp, layout.pp, layout.dp):
        raise ConfigError(f"checkpoint {save_dir}/{info['tag']} was saved with TP{saved['tp']}·PP{saved['pp']}"
                          f"·DP{saved['dp']} but this run is {layout.describe()}: resume with the same layout "
                          "or set train.save_dir to a new directory")
    state = engine.load(save_dir, tag=info["tag"])
    if state is None:
        raise ConfigError(f"could not load checkpoint {save_dir}/{info['tag']}: delete it or set a new train.save_dir")
    return int(state["step"]), int(state["consumed_samples"])
