"""Atomic conversion output: everything is written under a temporary sibling name and renamed at the end.

An interrupted or failed conversion leaves no directory that looks finished (the temporary one is
removed on errors; a killed process leaves only ``.OUT.tmp-PID@HOST``, which the next run with the
same ``OUT`` removes once that process is gone). An existing ``OUT`` is an error unless ``--force``,
and with ``--force`` it is only replaced once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator

from megatron_llama.config import ConfigError


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def owned_name(out: Path, kind: str) -> Path:
    """``.OUT.KIND-PID@HOST``: a temporary sibling of ``out`` that names the process writing it."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}@{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead(parent: Path, kind: str, suffix: str = "", name: str = "*") -> list[Path]:
    """Remove the ``.NAME.KIND-PID@HOST<suffix>`` directories in ``parent`` (``name``: one NAME, or
    any) left by processes of this host that are gone (a SIGKILLed conversion); those of live
    processes, and of other hosts sharing the file system (their PIDs mean nothing here), are kept.
    ``@HOST`` may be missing (older versions): this host. Returns what was removed."""
    pattern = re.compile(rf"^\..+\.{re.escape(kind)}-(\d+)(?:@([^/]+))?{re.escape(suffix)}$")
    removed = []
    for p in parent.glob(f".{name}.{kind}-*{suffix}") if parent.is_dir() else []:
        m = pattern.match(p.name)
        if m is None or (m.group(2) or _host()) != _host() or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _tmp_name(out: Path) -> Path:
    return owned_name(out, "tmp")


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"output {out} already exists: choose another directory or pass --force to replace it")


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yields the temporary directory to write into (it does not exist yet); renames it to ``out`` on success."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead(out.parent, "tmp", name=out.name)
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
