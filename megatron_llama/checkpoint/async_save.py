"""Asynchronous checkpoint saves (``train.async_save``): training waits only for a copy to host memory.

At a save step every rank runs DeepSpeed's own ``save_checkpoint`` (so the checkpoint holds exactly
what a synchronous save writes: module, fp32 masters, moments, client state, in the same files),
with DeepSpeed's ``checkpoint_engine`` swapped for :class:`HostSnapshot`. Where DeepSpeed would
``torch.save(state, path)``, the snapshot copies every storage of ``state`` into a host buffer
(page-locked on GPU runs, plain memory on CPU) and keeps ``(path, copy)``; the copies are waited
for, and training goes on. A background thread (:class:`_Writer`) then ``torch.save``\\ s the copies
into ``stepN.tmp``, fsyncs and CRCs each file. The copy keeps torch.save's storage structure (views
stay views of one storage), so the files are the bytes a synchronous save writes (on CPU, bytewise;
from a GPU the only difference is the storage location tag: ``cpu``, which loads the same).

Protocol (megatron_llama/checkpoint/directory.py, unchanged): ``stepN.tmp``, CRC table, ``run.json``
and ``latest`` last. The commit is collective and happens at a step boundary: every rank calls
:meth:`AsyncSaves.poll` after each step while a save is pending (one all-reduce of one integer);
once every rank's writer is done, the file tables are gathered, rank 0 hashes the few files DeepSpeed
wrote itself (its recovery scripts), writes ``run.json``, renames, points ``latest`` at it, prunes.
A second save first waits for the first (:meth:`AsyncSaves.wait`), so buffers are reused only once
written; the launcher waits before a signal save, the final save and exit. A rank that dies during
the background write leaves ``stepN.tmp`` without ``run.json``: never loaded, removed at the next
resume, and ``latest`` still names the previous complete checkpoint.

Why a thread, not a process: the copies live in this process's page-locked memory, which another
process could only see through shared memory registered with CUDA in both; the writer's work is
``write``/``fsync`` system calls and zlib's CRC, which run without the GIL (torch.save releases it
while it writes a storage), so the training thread keeps its interpreter; and a writer that dies
with its rank is exactly the failure the protocol already handles.

Host memory: one buffer per storage written, kept from save to save (the first save allocates and
pins them; the next ones reuse them), i.e. the size of this rank's shards (:attr:`HostBuffers.nbytes`).
"""
from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from . import integrity
from .crc32 import crc32_of
from .directory import TMP_SUFFIX, begin_save, client_state, finish_save, run_meta, tag_for


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class HostBuffers:
    """Host copies of the storages a save writes, one per ``(file, storage number)``, reused by the
    next save when the size is the same. On a GPU run they are page-locked with ``cudaHostRegister``
    on plain allocations (exact sizes: torch's pinned allocator rounds every block up to a power of
    two), falling back to ``pin_memory=True`` if registering fails; on CPU they are plain memory."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._registered: list[int] = []
        self.allocations = 0  # buffers made so far (a reused buffer does not count again)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def get(self, key: tuple[str, int], nbytes: int) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != nbytes:
            if buf is not None:
                self._release(buf)
            buf = self._buffers[key] = self._allocate(nbytes)
            self.allocations += 1
        return buf

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if not self.pin or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            if torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0) == 0:
                self._registered.append(buf.data_ptr())
                return buf
        except (AttributeError, RuntimeError):
            pass
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _release(self, buf: torch.Tensor) -> None:
        if buf.data_ptr() in self._registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            self._registered.remove(buf.data_ptr())

    def close(self) -> None:
        for buf in self._buffers.values():
            self._release(buf)
        self._buffers.clear()


class HostSnapshot(TorchCheckpointEngine):
    """DeepSpeed's checkpoint-engine hook: ``save(state, path)`` copies ``state`` into host buffers and
    records ``(path, copy)`` in :attr:`files` instead of writing. Loading is torch's (unchanged).
    ``preserves_storage_sharing`` stays True, as for torch.save, so DeepSpeed clones what it always
    clones (pipeline layer weights) and the files come out the same."""

    def __init__(self, buffers: HostBuffers, tmp_dir: Path):
        super().__init__(None)
        self.zipfile_serialization = True  # DeepSpeed's default (checkpoint_serialization), as the sync save
        self.buffers, self.tmp_dir = buffers, Path(tmp_dir)
        self.files: list[tuple[Path, object]] = []

    def save(self, state_dict, path: str) -> None:
        name = str(Path(path).relative_to(self.tmp_dir))
        storages: dict[int, torch.UntypedStorage] = {}  # source storage -> its host copy, per file

        def host_storage(t: torch.Tensor) -> torch.UntypedStorage:
            src = t.untyped_storage()
            if src._cdata not in storages:
                buf = self.buffers.get((name, len(storages)), src.nbytes())
                if src.nbytes():
                    buf.copy_(torch.empty(0, dtype=torch.uint8, device=src.device).set_(src), non_blocking=True)
                storages[src._cdata] = buf.untyped_storage()
            return storages[src._cdata]

        self.files.append((Path(path), _copy_structure(state_dict, host_storage, {})))

    def commit(self, info) -> bool:
        return True


def _copy_structure(obj, host_storage: Callable[[torch.Tensor], torch.UntypedStorage], memo: dict):
    """``obj`` with every tensor replaced by the same view (offset, shape, strides, dtype,
    requires_grad, Parameter or not) of its storage's host copy, containers rebuilt with their
    types and attributes, shared objects still shared (``memo``) and other leaves deep-copied:
    torch.save pickles the copy exactly as it would the original, and training may change the
    original right away."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = torch.empty(0, dtype=obj.dtype).set_(host_storage(obj), obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        elif obj.requires_grad:
            out.requires_grad_(True)
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type (OrderedDict) and attributes (a state_dict's _metadata)
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = _copy_structure(v, host_storage, memo)
    elif isinstance(obj, list):
        out = copy.copy(obj)
        memo[id(obj)] = out
        out[:] = [_copy_structure(v, host_storage, memo) for v in obj]
    elif isinstance(obj, tuple):
        items = [_copy_structure(v, host_storage, memo) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            out = obj
        else:
            out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        out = copy.deepcopy(obj)
    memo[id(obj)] = out
    return out


class _Writer(threading.Thread):
    """Writes the snapshot's files one after the other, fsyncs and CRCs each (from the page cache,
    just written); ``files`` = ``{path relative to stepN.tmp: [size, crc32]}``, ``error`` = what went
    wrong, if anything. ``after_file(n)`` runs after the n-th file (test hook: launch/faults.py)."""

    def __init__(self, snapshot: HostSnapshot, after_file: Optional[Callable[[int], None]] = None):
        super().__init__(name="mllama-checkpoint-writer", daemon=True)  # dies with its rank: never half-committed
        self.snapshot, self.after_file = snapshot, after_file
        self.files: dict[str, list[int]] = {}
        self.error: Optional[str] = None
        self.bytes_written = 0
        self.seconds = 0.0
        self.phase_s: dict[str, float] = {"serialize": 0.0, "fsync": 0.0, "crc": 0.0}  # where the write time went

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            for n, (path, state) in enumerate(self.snapshot.files, 1):
                t = time.perf_counter()
                with integrity.without_zip_crc():  # as the synchronous save: the table replaces it
                    torch.save(state, path, _use_new_zipfile_serialization=self.snapshot.zipfile_serialization)
                t = self._phase("serialize", t)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                t = self._phase("fsync", t)
                size = path.stat().st_size
                self.files[str(path.relative_to(self.snapshot.tmp_dir))] = [size, crc32_of(path)]
                self._phase("crc", t)
                self.bytes_written += size
                if self.after_file is not None:
                    self.after_file(n)
        except Exception as e:  # noqa: BLE001 - reported by every rank at the commit
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.perf_counter() - t0

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.phase_s[name] += now - since
        return now


@dataclass
class _Pending:
    root: Path
    step: int
    meta: Optional[dict]
    writer: _Writer
    started: float = field(default_factory=time.perf_counter)


@dataclass
class SaveTiming:
    """What the last asynchronous save cost: ``stall_s`` (the training loop waited for the copy),
    ``write_s`` / ``bytes`` (this rank's background write; ``write_phases_s`` splits it into
    serialize / fsync / crc), ``host_bytes`` (buffers held)."""
    step: int = 0
    stall_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0
    host_bytes: int = 0
    write_phases_s: dict[str, float] = field(default_factory=dict)


class AsyncSaves:
    """At most one asynchronous save in flight. Every rank calls every method at the same step boundary.

    ``engine`` is pipelines' TrainEngine (``save(dir, tag, client_state, checkpoint_engine=...)``);
    ``device`` that of the run's backend (for the one-integer all-reduce of :meth:`poll`).
    ``after_file(step, n)``: test hook run by the writer after its n-th file of checkpoint ``step``.
    """

    def __init__(self, engine, save_dir: str, keep_last: int, device: torch.device,
                 after_file: Optional[Callable[[int, int], None]] = None):
        self.engine, self.save_dir, self.keep_last, self.device = engine, save_dir, keep_last, device
        self.after_file = after_file
        self.buffers = HostBuffers(pin=device.type == "cuda")
        self.pending: Optional[_Pending] = None
        self.timing = SaveTiming()

    def save(self, cfg, layout, step: int, consumed_samples: int, last_loss: float, reason: str = "interval",
             extra: Optional[dict] = None) -> None:
        """Snapshot ``step`` into host memory and start writing it; returns once the copy is done."""
        self.wait()
        t0 = time.perf_counter()
        root, tag = begin_save(self.save_dir, step)
        snapshot = HostSnapshot(self.buffers, root / (tag + TMP_SUFFIX))
        self.engine.save(self.save_dir, tag + TMP_SUFFIX, client_state(step, consumed_samples),
                         checkpoint_engine=snapshot)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are in host memory: training may change the originals
        meta = run_meta(cfg, layout, step, consumed_samples, last_loss, reason, extra) if _dist()[0] == 0 else None
        hook = None if self.after_file is None else (lambda n: self.after_file(step, n))
        writer = _Writer(snapshot, hook)
        writer.start()
        self.pending = _Pending(root, step, meta, writer)
        self.timing = SaveTiming(step=step, stall_s=time.perf_counter() - t0, host_bytes=self.buffers.nbytes)

    def poll(self) -> Optional[Path]:
        """Commit the pending save if every rank's writer has finished; its directory, else None.
        One all-reduce while a save is pending, nothing otherwise."""
        if self.pending is None:
            return None
        busy = torch.tensor([int(self.pending.writer.is_alive())], dtype=torch.int32, device=self.device)
        if _dist()[1] > 1:
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return None if int(busy.item()) else self._commit()

    def wait(self) -> Optional[Path]:
        """Wait for the pending save's writers and commit it; its directory, or None if none was pending."""
        if self.pending is None:
            return None
        self.pending.writer.join()
        return self._commit()

    def _commit(self) -> Path:
        p, self.pending = self.pending, None
        w = p.writer
        self.timing.write_s, self.timing.bytes = w.seconds, w.bytes_written
        self.timing.write_phases_s = dict(w.phase_s)
        mine = {"files": w.files, "error": w.error}
        rank, world = _dist()
        every = [mine]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, mine)
        failed = [(r, o["error"]) for r, o in enumerate(every) if o["error"]]
        tmp = p.root / (tag_for(p.step) + TMP_SUFFIX)
        if failed:
            r, err = failed[0]
            raise RuntimeError(f"the background write of checkpoint {tmp} failed on rank {r} ({err}); "
                               "the previous complete checkpoint is intact and a restart resumes from it")
        files: dict[str, list[int]] = {}
        for o in every:
            files.update(o["files"])
        if rank == 0:  # what DeepSpeed wrote itself, synchronously (zero_to_fp32.py and friends)
            for name in integrity.list_files(tmp):
                if name not in files:
                    files[name] = [(tmp / name).stat().st_size, crc32_of(tmp / name)]
        return finish_save(p.root, p.step, p.meta, dict(sorted(files.items())), self.keep_last)

    def close(self) -> None:
        self.buffers.close()

    def __enter__(self) -> "AsyncSaves":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.wait()  # normal exit: the last interval save is complete before the process ends
        self.close()
