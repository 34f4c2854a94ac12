"""Resuming a run from any checkpoint format its ``train.save_dir`` may hold.

``directory.resume`` implements the run-directory protocol (candidates, integrity, fallback,
``latest``) and loads DeepSpeed's own checkpoints; it knows no other format, so the protocol
does not depend on the stores built on it. This module sits above both and passes it a loader
for each other ``run.json`` ``"format"``: today the layout-free store that
``mllama-convert reshard`` writes (``resharded.py``).
"""
from __future__ import annotations


def resume(engine, layout, save_dir: str, warn=None) -> tuple[int, int]:
    """``directory.resume`` with every format's loader: ``(step, consumed_samples)`` or ``(0, 0)``."""
    from . import directory, resharded  # resharded brings megatron-core: only when a run resumes
    return directory.resume(engine, layout, save_dir, warn, loaders={resharded.FORMAT: resharded.load_into_engine})
