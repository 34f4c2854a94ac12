"""Start this node's trainer processes and restart them when they fail (bounded, with backoff).

``mllama-train CONFIG`` started without a launcher runs :func:`supervise` for its local ranks; under
SLURM, ``launch/slurm/train.sbatch`` runs one supervisor per node (``python -m launch.supervisor``)::

    python -m launch.supervisor --nnodes 2 --node-rank 0 --master-addr node01 --master-port 29500 \\
        --nproc-per-node 8 -- configs/llama-7b.yaml train.steps=1000

Each attempt starts ``nproc`` processes of ``launch.train`` with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set (no torchrun in between, so a child's one-line error and exit status
reach the caller unchanged). When one rank exits non-zero the others get ``grace_s`` to exit, then
SIGKILL. The attempt's status (launch/exit_codes.py) is 2 if any rank reported bad input, else the
first rank's non-zero status, else 0. Statuses 1 (failed) and 3 (hang) are restarted up to
``train.max_restarts`` times, waiting ``train.restart_backoff_s`` doubled each time (at most 5 min);
every attempt resumes from the newest complete checkpoint by itself. SIGTERM / SIGUSR1 / SIGINT
are passed to every rank (they save and exit 128+N) and end supervision with that status; a second
SIGINT (Ctrl-C pressed again) stops the ranks at once, without waiting for their checkpoint.

Console: with a ``log_dir`` (``<train.save_dir>/logs``), each rank's stderr is copied to
``log_dir/rank-N.log`` (appended, one header per attempt) and passed to the console as it comes,
except tracebacks: from ``Traceback (most recent call last):`` on, a rank's stderr stays in its log
until the attempt is over. Then the console gets the traceback of the rank that caused the failure
(none if it was killed: the supervisor's line says by what) and one line naming the other ranks'
logs: when one rank dies, its peers' "Connection closed by peer" tracebacks do not bury the cause.

Multi-node: every node's supervisor restarts its own ranks; ranks on the healthy nodes notice the
lost peers (collective error, or the hang watchdog) and restart too, meeting again at the same
master address and port.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import exit_codes

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
MAX_BACKOFF_S = 300.0


@dataclass
class Attempt:
    status: int
    cause: str  # "rank 1 killed by SIGKILL", "rank 0 exited 3", ... ("" when all succeeded)


class _Forwarder:
    """While active, the forwarded signals go to the running children instead of killing us."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C again: stop now
            _say("interrupted again: stopping the ranks now, without waiting for their checkpoint "
                 "(the newest complete one stays)")
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
            return
        if self.received is None:
            self.received = signum
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def __enter__(self):
        for s in FORWARDED:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._previous.items():
            signal.signal(s, old)


def _describe_rc(rank: int, rc: int) -> str:
    if rc < 0:
        try:
            return f"rank {rank} was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"rank {rank} was killed by signal {-rc}"
    return f"rank {rank} exited with status {rc} ({exit_codes.describe(exit_codes.from_returncode(rc))})"


# a line opening a Python traceback (torch.distributed prefixes a rank's uncaught one with "[rankN]: ")
TRACEBACK = re.compile(rb"^(\[rank\d+\]: )?Traceback \(most recent call last\):", re.M)


@dataclass
class _RankStderr:
    """One rank's stderr: copied to its log, passed to the console up to its first traceback, held after."""
    rank: int
    log_path: Path
    held: list = field(default_factory=list)
    thread: Optional[threading.Thread] = None

    def start(self, pipe, attempt: int, console_lock: threading.Lock) -> None:
        self.thread = threading.Thread(target=self._copy, args=(pipe, attempt, console_lock), daemon=True)
        self.thread.start()

    def _copy(self, pipe, attempt: int, console_lock: threading.Lock) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            pending = b""
            while chunk := os.read(pipe.fileno(), 1 << 16):
                log.write(chunk)
                log.flush()
                pending += chunk
                while (cut := max(pending.rfind(b"\n"), pending.rfind(b"\r"))) >= 0:  # whole lines (and \r bars)
                    self._route(pending[:cut + 1], console_lock)
                    pending = pending[cut + 1:]
            if pending:
                self._route(pending, console_lock)
        pipe.close()

    def _route(self, text: bytes, console_lock: threading.Lock) -> None:
        if not self.held:
            found = TRACEBACK.search(text)
            at = len(text) if found is None else found.start()
            if at:
                with console_lock:
                    sys.stderr.buffer.write(text[:at])
                    sys.stderr.flush()
            text = text[at:]
        if text:
            self.held.append(text)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=10)


def _show_held(streams: list[_RankStderr], cause: Optional[int]) -> None:
    """After an attempt: the traceback of the rank that caused it (if it has one), and where the
    other ranks' tracebacks are."""
    held = [s for s in streams if s.held]
    if not held:
        return
    shown = next((s for s in held if s.rank == cause), None if cause is not None else held[0])
    if shown is not None:
        sys.stderr.buffer.write(b"".join(shown.held))
        sys.stderr.flush()
    others = [s for s in held if s is not shown]
    if others:
        ranks = ", ".join(str(s.rank) for s in others)
        where = others[0].log_path if len(others) == 1 else others[0].log_path.with_name("rank-N.log")
        _say(f"{'rank' if len(others) == 1 else 'ranks'} {ranks} also failed, as a consequence: "
             f"traceback{'s' if len(others) > 1 else ''} in {where}")


def run_ranks(argv: list[str], nproc: int, forwarder: _Forwarder, *, node_rank: int = 0, nnodes: int = 1,
              master_addr: str = "127.0.0.1", master_port: int = 0, attempt: int = 0,
              grace_s: float = 5.0, log_dir: Optional[Path] = None, module: str = "launch.train") -> Attempt:
    """One attempt: start ``nproc`` ranks of ``python -m module argv`` (the trainer, or ``launch.eval``)
    on this node and wait for them. With ``log_dir``, the ranks' stderr goes through
    :class:`_RankStderr` (see the module doc)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(WORLD_SIZE=str(nnodes * nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=master_addr,
               MASTER_PORT=str(master_port or _free_port()), MLLAMA_ATTEMPT=str(attempt))
    procs, streams = [], []
    lock = threading.Lock()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    for local in range(nproc):
        rank = node_rank * nproc + local
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], preexec_fn=_die_with_parent,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(local)),
                                      stderr=subprocess.PIPE if log_dir is not None else None))
        if log_dir is not None:
            streams.append(_RankStderr(rank, log_dir / f"rank-{rank}.log"))
            streams[-1].start(procs[-1].stderr, attempt, lock)
    forwarder.procs = procs
    first: Optional[tuple[int, int]] = None  # (local index, returncode) of the first rank to fail
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if first is None:
            failed = [(i, rc) for i, rc in enumerate(codes) if rc not in (None, 0) and not _is_clean_stop(rc)]
            if failed:  # the cause: a killed or hung rank rather than the peer that noticed it
                first = min(failed, key=lambda f: (f[1] >= 0, f[1] != exit_codes.HANG, f[0]))
                deadline = time.monotonic() + grace_s
        if all(rc is not None for rc in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    forwarder.procs = []
    for stream in streams:
        stream.join()
    _show_held(streams, None if first is None else node_rank * nproc + first[0])
    if any(rc == exit_codes.BAD_INPUT for rc in codes):
        return Attempt(exit_codes.BAD_INPUT, "")
    if first is not None:
        i, rc = first
        return Attempt(exit_codes.from_returncode(rc), _describe_rc(node_rank * nproc + i, rc))
    bad = [(i, rc) for i, rc in enumerate(codes) if rc != 0]
    if bad:  # every rank stopped cleanly by a signal (or several statuses >= 128)
        return Attempt(exit_codes.from_returncode(bad[0][1]), "")
    return Attempt(exit_codes.DONE, "")


def _die_with_parent() -> None:
    """In the child: a supervisor that is SIGKILLed (by a job scheduler, say) takes its ranks with it
    instead of leaving them orphaned and holding the GPUs (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _is_clean_stop(rc: int) -> bool:
    return rc > exit_codes.SIGNAL_BASE  # saved and stopped: the other ranks are saving too


def supervise(argv: list[str], nproc: int, max_restarts: int, backoff_s: float, *, node_rank: int = 0,
              nnodes: int = 1, master_addr: str = "127.0.0.1", master_port: int = 0,
              grace_s: float = 5.0, log_dir: Optional[Path] = None, module: str = "launch.train") -> int:
    """Run attempts until one ends with a status that is not restartable; returns that status."""
    attempt = 0
    with _Forwarder() as fwd:
        while True:
            result = run_ranks(argv, nproc, fwd, node_rank=node_rank, nnodes=nnodes, master_addr=master_addr,
                               master_port=master_port, attempt=attempt, grace_s=grace_s, log_dir=log_dir,
                               module=module)
            if fwd.received is not None:  # stopped on request: whatever the ranks did, don't restart
                return result.status if result.status > exit_codes.SIGNAL_BASE else exit_codes.for_signal(
                    fwd.received)
            if not exit_codes.should_restart(result.status):
                return result.status
            if attempt >= max_restarts:
                _say(f"{result.cause}; giving up after {max_restarts} restarts (exit {result.status})")
                return result.status
            wait = min(backoff_s * 2 ** attempt, MAX_BACKOFF_S)
            attempt += 1
            _say(f"{result.cause}; restarting from the newest complete checkpoint in {wait:.0f} s "
                 f"(restart {attempt} of {max_restarts})")
            end = time.monotonic() + wait
            while time.monotonic() < end and fwd.received is None:
                time.sleep(0.1)
            if fwd.received is not None:
                return exit_codes.for_signal(fwd.received)


def _say(text: str) -> None:
    print(f"mllama-train: {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[list[str]] = None) -> int:
    """One supervisor per node (SLURM): ``python -m launch.supervisor [options] -- CONFIG [overrides]``."""
    p = argparse.ArgumentParser(prog="python -m launch.supervisor", description=__doc__.split("\n\n")[0],
                                epilog=exit_codes.HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("SLURM_NNODES", "1")))
    p.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", "0")))
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="processes on this node (0 = one per visible GPU, or tp*pp*dp / nnodes on CPU)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- CONFIG.yaml [SECTION.KEY=VALUE ...]")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args:
        p.error("give the run after --: CONFIG.yaml [SECTION.KEY=VALUE ...]")
    from megatron_llama.config import ConfigError, load_config
    try:
        cfg = load_config(train_args[0], train_args[1:])
        nproc = args.nproc_per_node or _procs_per_node(cfg, args.nnodes)
        from .host_memory import check_async_save_memory
        import torch
        check_async_save_memory(cfg, nproc * args.nnodes, nproc, torch.cuda.is_available())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    return supervise(train_args, nproc, cfg.train.max_restarts, cfg.train.restart_backoff_s,
                     node_rank=args.node_rank, nnodes=args.nnodes, master_addr=args.master_addr,
                     master_port=args.master_port, log_dir=Path(cfg.train.save_dir) / "logs")


def _procs_per_node(cfg, nnodes: int) -> int:
    import torch
    from megatron_llama.config import ConfigError
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    world = cfg.parallel.tp * cfg.parallel.pp * (cfg.parallel.dp or 1)
    if world % nnodes:
        raise ConfigError(f"tp*pp*dp = {world} processes do not split evenly over {nnodes} nodes: "
                          "change parallel.dp or the node count")
    return world // nnodes


if __name__ == "__main__":
    sys.exit(main())
