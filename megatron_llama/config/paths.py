"""Output locations checked before any work starts: one ConfigError naming the flag, not an
OSError traceback after hours of tokenising or training."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def writable_dir(path: str, what: str) -> Path:
    """``path`` as a directory that exists (created with its parents) and accepts files."""
    d = Path(path)
    for p in (d, *d.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what}={path}: {p} is a file, not a directory: choose another location")
            break
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}-{os.environ.get('RANK', '0')}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}={path} is not writable ({e.strerror}): choose a directory you can "
                          "write to") from None
    return d


def output_prefix(prefix: str, what: str) -> Path:
    """``prefix`` whose files (``prefix.bin``, ``prefix.model``, ...) can be written: its directory
    is made writable and the prefix itself must not be an existing directory."""
    p = Path(prefix)
    if p.is_dir():
        raise ConfigError(f"{what}={prefix} is a directory: give a file prefix such as {p / 'corpus'}")
    writable_dir(str(p.parent), what)
    return p
