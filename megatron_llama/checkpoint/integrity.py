"""Per-file sizes and checksums of a checkpoint, recorded at save time and checked before loading.

``run.json`` (the completeness marker) carries ``files``: ``{relative path: [size, crc32]}`` for
every file of the checkpoint directory except ``run.json`` itself. The files are split over the
ranks, each hashes its share (just written, usually still in the page cache) and rank 0 gathers the
table. Measured for one rank holding a 26.3 GB ZeRO-1 checkpoint on H100 hosts: 9.3 s, 23 % of a
40 s synchronous save, with one thread (bench/results/h100-async-save-one-crc-thread.json); 1.7 to
2.1 s (13 to 16 GB/s from the page cache) with ``crc32.py``'s threads (h100-async-save.json,
h100-async-save-zip-crc.json). An asynchronous save hashes in its background writer instead.
Verification before a resume works the same way: sizes on every rank (a ``stat`` per file), CRCs
split over the ranks, the first problem found is reported by all; cold from disk, 13.0 s with 8
threads against 23.4 s with one on the same host (h100-async-save.json).

A checkpoint written before this table existed has no ``files``: it is accepted unchecked.

The table replaces the CRC-32 that ``torch.save`` writes for every record of its zip file
(:func:`without_zip_crc`): torch computes that one in the saving thread at zlib's speed (2.1 to
4.1 GB/s on H100 hosts; dropping it cut the background write of 26.3 GB from 20.4 s to 16.7 s in
bench/results/h100-async-save.json) and
``torch.load`` never checks it (a flipped byte in a tensor loads silently, mapped or not), so it
protected nothing. Checkpoint files still load with ``torch.load``; ``unzip -t`` reports their
records' CRCs as wrong.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .crc32 import crc32_files

MARKER = "run.json"


@contextlib.contextmanager
def without_zip_crc() -> Iterator[None]:
    """``torch.save`` in this block writes CRC 0 for its zip records. torch's serialization settings
    are per thread (torch.utils._config_module), so the asynchronous writer's thread sets its own."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def list_files(ckpt: Path) -> list[str]:
    """Every file under ``ckpt`` but ``run.json``, as sorted relative paths."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)


def _gather(local: dict) -> dict:
    """Union of every rank's dict (all ranks get it)."""
    rank, world = _dist()
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    out = {}
    for part in parts:
        out.update(part)
    return out


def manifest(ckpt: Path, collective: bool = True) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of the files under ``ckpt``; with ``collective`` every rank
    calls it and hashes a share, otherwise the calling process hashes everything (converters)."""
    rank, world = _dist() if collective else (0, 1)
    names = list_files(ckpt) if rank == 0 else None
    if world > 1:  # one listing, so every rank splits the same list
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    crcs = crc32_files([ckpt / n for n in names[rank::world]])
    mine = {n: [(ckpt / n).stat().st_size, crcs[ckpt / n]] for n in names[rank::world]}
    return dict(sorted((_gather(mine) if collective else mine).items()))


def check_sizes(ckpt: Path, files: Optional[dict]) -> Optional[str]:
    """The first missing or wrongly sized file, as a phrase; None when all match (or no table)."""
    for name, (size, _crc) in (files or {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    return None


def verify(ckpt: Path, files: Optional[dict]) -> Optional[str]:
    """Sizes, then CRCs split over the ranks; collective. The same answer on every rank."""
    problem = check_sizes(ckpt, files)
    if problem is None and files:
        rank, world = _dist()
        mine = sorted(files)[rank::world]
        crcs = crc32_files([ckpt / name for name in mine])
        problem = next((f"{name} has a wrong checksum" for name in mine if crcs[ckpt / name] != files[name][1]), None)
    found = _gather({_dist()[0]: problem})
    return next((p for _, p in sorted(found.items()) if p), None)
