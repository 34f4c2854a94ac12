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
point leaves either the previous ``latest`` or the new one, both complete. ``run.json`` lists every
file's size and CRC-32 (``integrity.py``); :func:`resume` verifies them and, when a file is missing,
truncated or corrupt, says so in one warning line and falls back to the previous complete
checkpoint. Pruning never removes the newest checkpoint whose files still have their sizes.
:func:`latest` trusts ``latest`` when it names a complete checkpoint (so pointing it at an older one rolls back), and
otherwise takes the newest complete directory. A checkpoint can only be resumed with the same
TP, PP and DP (DeepSpeed does not reshard); the error says so. A checkpoint whose ``run.json`` names
a ``format`` (e.g. the store ``mllama-convert reshard`` writes for another layout) is loaded by the
loader passed for that format in ``loaders``: this module knows no format but DeepSpeed's own
(``formats.resume`` passes them all).

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

from . import integrity

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
         reason: str = "interval", extra: Optional[dict] = None, on_written=None) -> Path:
    """Write a checkpoint of ``step`` on all ranks (see the module doc); returns its directory.
    ``extra`` is added to ``run.json`` (e.g. ``skipped_samples``, launch/rollback.py).
    ``on_written(step)`` runs on every rank once all shards are in ``stepN.tmp`` (a test hook).
    ``train.async_save`` writes the shards in the background instead (async_save.py)."""
    root, tag = begin_save(save_dir, step)
    _write_shards(engine, save_dir, tag + TMP_SUFFIX, client_state(step, consumed_samples))
    _barrier()  # every rank has written its shards
    files = integrity.manifest(root / (tag + TMP_SUFFIX))  # collective: the ranks share the hashing
    if on_written is not None:
        on_written(step)
    meta = run_meta(cfg, layout, step, consumed_samples, last_loss, reason, extra) if _rank() == 0 else None
    return finish_save(root, step, meta, files, cfg.train.keep_last)


def client_state(step: int, consumed_samples: int) -> dict:
    """What DeepSpeed stores next to the weights and gives back on load (:func:`_load`)."""
    return {"step": step, "consumed_samples": consumed_samples}


def begin_save(save_dir: str, step: int) -> tuple[Path, str]:
    """Step 1 of the protocol (every rank): stale ``*.tmp`` removed by rank 0, barrier. Returns
    ``(run directory, tag)``; the shards go to ``tag + TMP_SUFFIX``."""
    root = Path(save_dir)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step*" + TMP_SUFFIX):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()  # nobody writes into a directory rank 0 is still removing
    return root, tag_for(step)


def run_meta(cfg, layout, step: int, consumed_samples: int, last_loss: float, reason: str,
             extra: Optional[dict]) -> dict:
    """``run.json`` without its ``files`` table, as of the step being saved (rank 0)."""
    import deepspeed
    import megatron.core
    import torch
    return {"step": step, "consumed_samples": consumed_samples, "last_loss": last_loss, "reason": reason,
            "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size},
            "config": config_to_dict(cfg), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "megatron-core": getattr(megatron.core, "__version__", "?")}, **(extra or {})}


def finish_save(root: Path, step: int, meta: Optional[dict], files: dict, keep_last: int) -> Path:
    """Step 3 of the protocol (every rank, all shards written): rank 0 writes ``run.json`` with the
    ``files`` table into ``stepN.tmp``, renames it to ``stepN``, replaces ``latest``, prunes; barrier."""
    tag = tag_for(step)
    final, tmp = root / tag, root / (tag + TMP_SUFFIX)
    if _rank() == 0:
        meta = dict(meta)
        meta["files"] = files
        _write_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
        if final.exists():  # a complete checkpoint of this step from a run that crashed before `latest`
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, tag)
        prune(root, keep_last)
    _barrier()
    return final


def check_run_dir(save_dir: str) -> None:
    """Refuse a ``train.save_dir`` that is itself one checkpoint (it holds ``run.json``) rather than a
    run directory of ``stepN/`` checkpoints: ``latest()`` would find nothing there and the run
    would silently start from scratch (e.g. with the output of ``mllama-convert hf-to-native``)."""
    if (Path(save_dir) / META).is_file():
        raise ConfigError(f"train.save_dir={save_dir} is a single checkpoint (it has {META}), not a run "
                          f"directory: to start from its weights set train.init_from={save_dir} and a new "
                          "train.save_dir; to resume a run, give the directory that holds its stepN/ and latest")


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
    """Keep the newest ``keep_last`` complete checkpoints (0 = all), the one ``latest`` names and
    the newest one whose files all still have their recorded sizes; remove stale temporary
    directories."""
    for stale in root.glob("step*" + TMP_SUFFIX):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    complete = complete_checkpoints(root)
    pinned = {_read_latest(root)}
    pinned.update(p.name for p in complete[-keep_last:])
    intact = next((p for p in reversed(complete) if integrity.check_sizes(p, _files_of(p)) is None), None)
    if intact is not None:
        pinned.add(intact.name)
    for old in complete:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)


def _files_of(ckpt: Path) -> Optional[dict]:
    try:
        return json.loads((ckpt / META).read_text()).get("files")
    except (OSError, ValueError):
        return None


def _read_latest(root: Path) -> Optional[str]:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def candidates(save_dir: str) -> list[Path]:
    """Complete checkpoints in the order a resume tries them: the one ``latest`` names (so pointing
    it at an older one rolls back) and then the older ones, newest first; without a valid
    ``latest``, all of them, newest first. Temporary directories never count."""
    root = Path(save_dir)
    named = _read_latest(root)
    found = complete_checkpoints(root)
    names = [p.name for p in found]
    if named in names:
        found = found[:names.index(named) + 1]
    return found[::-1]


def _meta(ckpt: Path) -> Optional[dict]:
    try:
        info = json.loads((ckpt / META).read_text())
    except (OSError, ValueError):
        return None
    info["tag"] = ckpt.name
    return info


def latest(save_dir: str) -> Optional[dict]:
    """Metadata (plus ``tag``) of the first of :func:`candidates` with a readable ``run.json``
    (not verified: see :func:`resume`), or None when there is none."""
    return next((m for p in candidates(save_dir) if (m := _meta(p)) is not None), None)


def resume(engine, layout, save_dir: str, warn=None, loaders: Optional[dict] = None) -> tuple[int, int]:
    """Load the newest complete, intact checkpoint: ``(step, consumed_samples)``, or ``(0, 0)``.

    Every rank calls it. A checkpoint whose files do not match the sizes and checksums in its
    ``run.json`` is skipped with one warning line (rank 0) naming it and the damage; the previous
    complete one is tried next, and ``latest`` is pointed at the one loaded (the damaged one stays
    on disk for inspection until pruned). Stale ``*.tmp`` directories of a crashed save are removed
    first. ``loaders``: ``{run.json "format": loader(engine, layout, step_dir, info) -> (step,
    consumed_samples)}`` for checkpoints not written by DeepSpeed.
    """
    root = Path(save_dir)
    if _rank() == 0 and root.is_dir():
        for stale in root.glob("step*" + TMP_SUFFIX):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    for i, ckpt in enumerate(candidates(save_dir)):
        info = _meta(ckpt)
        problem = "run.json is unreadable" if info is None else integrity.verify(ckpt, info.get("files"))
        if problem is not None:
            if _rank() == 0:
                (warn or _warn)(f"warning: checkpoint {ckpt} is damaged ({problem}): falling back to the "
                                "previous complete checkpoint")
            continue
        loaded = _load(engine, layout, save_dir, info, loaders or {})
        if i:  # `latest` now names what was loaded: latest() agrees, the damaged one is not tried again
            if _rank() == 0:
                _write_atomic(root / LATEST, ckpt.name)
            _barrier()
        return loaded
    return 0, 0


def _warn(line: str) -> None:
    import sys
    print(line, file=sys.stderr, flush=True)


def _load(engine, layout, save_dir: str, info: dict, loaders: dict) -> tuple[int, int]:
    saved = info["layout"]
    if (saved["tp"], saved["pp"], saved["dp"]) != (layout.tp, layout.pp, layout.dp):
        raise ConfigError(f"checkpoint {save_dir}/{info['tag']} was saved with TP{saved['tp']}·PP{saved['pp']}"
                          f"·DP{saved['dp']} but this run is {layout.describe()}: resume with the same layout, "
                          f"convert it (mllama-convert reshard {save_dir} NEW_DIR --tp T --pp P --dp D) "
                          "or set train.save_dir to a new directory")
    fmt = info.get("format")
    if fmt is not None:  # not DeepSpeed's own files, e.g. written by `mllama-convert reshard` for this layout
        if fmt not in loaders:
            raise ConfigError(f"checkpoint {save_dir}/{info['tag']} is in the {fmt!r} format, which this version "
                              "cannot load: use the version that wrote it or set train.save_dir to a new directory")
        return loaders[fmt](engine, layout, Path(save_dir) / info["tag"], info)
    try:
        state = engine.load(save_dir, tag=info["tag"])
    except (RuntimeError, KeyError, ValueError, OSError) as e:  # intact files that do not fit this model
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not load checkpoint {save_dir}/{info['tag']} into this model ({first}): "
                          "resume with the config it was saved with (its run.json) or set train.save_dir "
                          "to a new directory") from None
    if state is None:
        raise ConfigError(f"could not load checkpoint {save_dir}/{info['tag']}: delete it or set a new train.save_dir")
    return int(state["step"]), int(state["consumed_samples"])
