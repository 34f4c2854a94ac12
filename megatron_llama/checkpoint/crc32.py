"""CRC-32 (zlib's) of large files with several reader threads.

One thread reading a checkpoint file sequentially got ~1.7 GB/s from the H100 machine's disk, and
DeepSpeed's load waited for that before it began
(bench/results/h100-async-save-one-crc-thread.json). Here a file is cut into ``CHUNK`` ranges; a
pool of threads reads them (``os.preadv`` into a buffer reused per thread) and hashes each one
(``zlib.crc32`` releases the GIL), so the disk sees several requests at once. The ranges' CRCs are
joined with :func:`crc32_combine`, the GF(2) polynomial arithmetic behind zlib's ``crc32_combine``
(which Python's ``zlib`` does not expose): appending ``n`` bytes to a message multiplies its CRC by
x^(8n) modulo the CRC polynomial, then adds the appended bytes' CRC.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

CHUNK = 32 << 20
THREADS = max(1, min(8, os.cpu_count() or 1))
_POLY = 0xEDB88320  # the CRC-32 polynomial in reflected bit order (bit 31 is x^0)


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in reflected bit order."""
    product, m = 0, 1 << 31
    while a:
        if a & m:
            product ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


_X2N = [1 << 30]  # x^(2^k) mod p for k = 0..31 (x^1 is bit 30)
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x8nmodp(n: int) -> int:
    """x^(8n) mod p: what appending ``n`` bytes multiplies a CRC by."""
    product, k = 1 << 31, 3
    while n:
        if n & 1:
            product = _multmodp(_X2N[k & 31], product)
        n >>= 1
        k += 1
    return product


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2 if len2 else crc1


_local = threading.local()


def _range_crc(path: Path, offset: int, length: int) -> int:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < length:
        buf = _local.buf = bytearray(max(length, CHUNK))
    view, done = memoryview(buf), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while done < length:
            n = os.preadv(fd, [view[done:length]], offset + done)
            if n == 0:
                raise OSError(f"{path} ended at byte {offset + done} while it was being read")
            done += n
    finally:
        os.close(fd)
    return zlib.crc32(view[:length])


def crc32_files(paths: Iterable[Path], threads: Optional[int] = None) -> dict[Path, int]:
    """``{path: crc32}`` of every file, its ranges read and hashed by ``threads`` (default
    :data:`THREADS`) threads."""
    jobs = []
    for path in paths:
        size = os.stat(path).st_size
        jobs += [(path, off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)] or [(path, 0, 0)]
    with ThreadPoolExecutor(max_workers=threads or THREADS) as pool:
        crcs = list(pool.map(lambda job: _range_crc(*job), jobs))
    out: dict[Path, int] = {}
    for (path, _off, length), crc in zip(jobs, crcs):  # each file's ranges in order
        out[path] = crc32_combine(out[path], crc, length) if path in out else crc
    return out


def crc32_of(path: Path, threads: Optional[int] = None) -> int:
    return crc32_files([path], threads)[path]
