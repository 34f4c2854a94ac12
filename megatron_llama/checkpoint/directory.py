"""Atomic run checkpoints under ``train.save_dir`` and auto-resume from the newest complete one.

Layout::

    step0000200/           DeepSpeed checkpoint (model states per TP x PP rank, ZeRO shards)
    step0000200/run.json   resolved config, layout, step, consumed samples, last loss, versions
    step0000300.tmp/       a checkpoint being written (or left half-written by a crash): never loaded
    latest                 name of the newest complete checkpoint, updated last

Protocol of :func:`save` (every rank calls it at the same step boundary):

1. rank 0 removes stale ``*.tmp`` directories (crashed saves), barrier;
2. every rank writes its shards into ``stepNNNNNNN.tmp`` (DeepSpeed, told not to touch ``latest``);
3. barrier: every rank is done; rank 0 writes ``run.json`` (the completeness marker) into the
   temporary directory, renames it to ``stepNNNNNNN``, then replaces ``latest`` (write + rename),
   then prunes to the newest ``train.keep_last`` complete checkpoints (0 = keep all); barrier.

A checkpoint is *complete* when its directory has its final name and a ``run.json``. A crash at any
point leaves either the previous ``latest`` or the new one, both complete. :func:`latest` trusts
``latest`` when it names a complete checkpoint (so pointing it at an older one rolls back), and
otherwise takes the newest complete directory. A checkpoint can only be resumed with the same
TP, PP and DP (DeepSpeed does not reshard); the error says so. ``mllama-convert reshard`` writes a
checkpoint for another layout (``resharded.py``), which :func:`resume` loads like any other.

The functions also work without torch.distributed (one process; unit tests).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_llama.config import ConfigError, config_to_dict

META = "run.json"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
_TAG = re.compile(r"^step(\d{7,})$")


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shards(engine, save_dir: str, tag: str, state: dict) -> None:
    """Every rank writes its part; DeepSpeed must not write its own ``latest`` (ours comes last)."""
    engine.save(save_dir, tag, state)


def save(engine, cfg, layout, save_dir: str, step: int, consumed_samples: int, last_loss: float,
         reason: str = "interval", extra: Optional[dict] = None) -> Path:
    """Write a checkpoint of ``step`` on all ranks (see the module doc); returns its directory.
    ``extra`` is added to ``run.json`` (e.g. ``skipped_samples``, launch/rollback.py)."""
    root = Path(save_dir)
    tag = tag_for(step)
    tmp_tag = tag + TMP_SUFFIX
    final, tmp = root / tag, root / tmp_tag
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step*" + TMP_SUFFIX):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()  # nobody writes into a directory rank 0 is still removing
    _write_shards(engine, save_dir, tmp_tag, {"step": step, "consumed_samples": consumed_samples})
    _barrier()  # every rank has written its shards
    if _rank() == 0:
        import deepspeed
        import megatron.core
        import torch
        meta = {"step": step, "consumed_samples": consumed_samples, "last_loss": last_loss, "reason": reason,
                "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size},
                "config": config_to_dict(cfg), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                             "megatron-core": getattr(megatron.core, "__version__", "?")}, **(extra or {})}
        _write_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
        if final.exists():  # a complete checkpoint of this step from a run that crashed before `latest`
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, tag)
        prune(root, cfg.train.keep_last)
    _barrier()
    return final


def _step_of(path: Path) -> Optional[int]:
    m = _TAG.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories (final name and ``run.json``), oldest first."""
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and p.is_dir() and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (0 = all) and the one ``latest`` names;
    remove stale temporary directories."""
    for stale in root.glob("step*" + TMP_SUFFIX):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    pinned = _read_latest(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != pinned:
            shutil.rmtree(old, ignore_errors=True)


def _read_latest(root: Path) -> Optional[str]:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def latest(save_dir: str) -> Optional[dict]:
    """Metadata (plus ``tag``) of the checkpoint to resume from, or None when there is none.

    ``latest`` when it names a complete checkpoint; otherwise the newest complete one (``latest``
    missing, or naming a directory without ``run.json``). Temporary directories never count.
    """
    root = Path(save_dir)
    named = _read_latest(root)
    candidates = complete_checkpoints(root)
    chosen = next((p for p in candidates if p.name == named), None) or (candidates[-1] if candidates else None)
    if chosen is None:
        return None
    try:
        info = json.loads((chosen / META).read_text())
    except (OSError, ValueError):
        return None
    info["tag"] = chosen.name
    return info


def resume(engine, layout, save_dir: str) -> tuple[int, int]:
    """Load the newest complete checkpoint if there is one: ``(step, consumed_samples)``, or ``(0, 0)``."""
    info = latest(save_dir)
    if info is None:
        return 0, 0
    root = Path(save_dir)
    saved = info["layout"]
    if (saved["tp"], saved["pp"], saved["dp"]) != (layout.tp, layout.pp, layout.dp):
        raise ConfigError(f"checkpoint {save_dir}/{info['tag']} was saved with TP{saved['tp']}·PP{saved['pp']}"
                          f"·DP{saved['dp']} but this run is {layout.describe()}: resume with the same layout, "
                          f"convert it (mllama-convert reshard {save_dir} NEW_DIR --tp T --pp P --dp D) "
                          "or set train.save_dir to a new directory")
    if info.get("format") == "resharded":  # written by `mllama-convert reshard` for this layout
        from .resharded import load_into_engine
        return load_into_engine(engine, layout, root / info["tag"], info)
    state = engine.load(save_dir, tag=info["tag"])
    if state is None:
        raise ConfigError(f"could not load checkpoint {save_dir}/{info['tag']}: delete it or set a new train.save_dir")
    return int(state["step"]), int(state["consumed_samples"])
