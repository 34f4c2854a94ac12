"""Atomic conversion output: everything is written under a temporary sibling name and renamed at the end.

An interrupted or failed conversion leaves no directory that looks finished (the temporary one is
removed on errors; a killed process leaves only ``.OUT.tmp-PID``, which the next run with the same
``OUT`` removes). An existing ``OUT`` is an error unless ``--force``, and with ``--force`` it is only
replaced once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron_llama.config import ConfigError


def _tmp_name(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"output {out} already exists: choose another directory or pass --force to replace it")


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yields the temporary directory to write into (it does not exist yet); renames it to ``out`` on success."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _tmp_name(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
