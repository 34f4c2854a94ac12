"""A throwaway single-node SLURM (Debian's slurm-wlm 22.05) for tests: installed with apt when
missing, started by hand (no systemd, no cgroups), configured in a private directory through
``SLURM_CONF`` (``/etc/slurm`` is not touched) on free ports, torn down afterwards.

Settings that make it work in a container and fast enough for CI (checked on Debian 12):
``proctrack/linuxproc``, ``task/none``, no accounting, ``select/cons_tres`` with ``CR_CPU``,
``SlurmUser=root``; ``cred_expire=10`` and ``sched_interval=1`` so a requeued job starts again after
about 10 s instead of 2 minutes. munged must run as the munge user.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ["slurm-wlm", "munge"]


def unavailable_reason() -> Optional[str]:
    """Why a local SLURM cannot be had here (None when it can): installs the packages if needed."""
    if os.geteuid() != 0:
        return "needs root to install and start slurmctld/slurmd/munged"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env,
                       check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        out = getattr(e, "stderr", b"") or b""
        return f"apt-get could not install {' '.join(PACKAGES)}: {out.decode(errors='replace')[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """``with LocalSlurm(tmp, nodes=2) as slurm: slurm.run(["sbatch", ...])``.

    ``nodes`` > 1 starts that many slurmd on this host (``slurmd -N nodeK``, one port each, the
    host's CPUs split between them): Debian's build allows it, so multi-node job scripts run for real.
    """

    def __init__(self, root: Path, nodes: int = 1):
        self.root = Path(root)
        self.nodes = nodes
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def _node_lines(self) -> str:
        line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        fields = [f for f in line.split() if not f.startswith(("UpTime", "RealMemory"))]
        if self.nodes == 1:
            return " ".join(fields) + " NodeAddr=127.0.0.1 State=UNKNOWN"
        cpus = max(1, int(next(f for f in fields if f.startswith("CPUs=")).split("=")[1]) // self.nodes)
        return "\n".join(f"NodeName=node{k} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} "
                         f"CPUs={cpus} State=UNKNOWN" for k in range(self.nodes))

    def _start_munge(self) -> str:
        # munged checks every directory above its socket: outside pytest's private (0700) tmp tree
        mdir = self.munge_dir = Path(tempfile.mkdtemp(prefix="mllama-munge-"))
        os.chmod(mdir, 0o755)
        shutil.chown(mdir, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "-c", "-k", str(mdir / "munge.key")],
                           check=True)
            key = mdir / "munge.key"
        sock = mdir / "munge.socket"
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={sock}", f"--key-file={key}",
                        f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                        f"--seed-file={mdir / 'munged.seed'}"], check=True, timeout=30)
        return str(sock)

    def __enter__(self) -> "LocalSlurm":
        self.host = socket.gethostname()
        self.root.mkdir(parents=True, exist_ok=True)
        sock = self._start_munge()
        self.conf = f"""ClusterName=mllamaci
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={self.root}/ctld
SlurmdSpoolDir={self.root}/slurmd-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
{self._node_lines()}
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        (self.root / "slurm.conf").write_text(self.conf)
        (self.root / "ctld").mkdir()
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        names = [[]] if self.nodes == 1 else [["-N", f"node{k}"] for k in range(self.nodes)]
        for name in names:
            self.procs.append(subprocess.Popen(["slurmd", "-D", *name], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.wait_idle()
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
            states = p.stdout.split()
            if p.returncode == 0 and len(states) == self.nodes and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for f in sorted(self.root.glob("slurm*.log")):
            if f.exists():
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, env: Optional[dict] = None):
        return subprocess.run(cmd, env=dict(self.env, **(env or {})), capture_output=True, text=True,
                              check=check, timeout=timeout)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def __exit__(self, *exc) -> None:
        self.run(["scancel", "--full", "-u", "root"], check=False)
        end = time.monotonic() + 60  # let slurmstepd finish the jobs before its slurmd goes
        while time.monotonic() < end and self.run(["squeue", "-h"], check=False).stdout.strip():
            time.sleep(0.5)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        pid = self.munge_dir / "munged.pid"
        if pid.exists():
            try:
                munged = int(pid.read_text().strip())
                os.kill(munged, 15)
                for _ in range(50):  # it writes its seed file on the way out
                    os.kill(munged, 0)
                    time.sleep(0.1)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.munge_dir, ignore_errors=True)
