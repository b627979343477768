"""A real SLURM cluster on this machine for the tests: munged, slurmctld and one slurmd per node on
loopback, with their own config, ports, state, pid and log files in a temporary folder. Only the
processes it started are stopped (by their pid files).

Two nodes, n1 and n2 (slurmd -N n1, -N n2), each with its own port and NodeAddr=127.0.0.1: their names
do not resolve, as on clusters whose node names are not host names; SLURM reaches them by NodeAddr."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str:
    """Why no cluster can be started here ('' when it can)."""
    absent = [d for d in (*DAEMONS, "sbatch", "srun", "scontrol", "sinfo") if shutil.which(d) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return ""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


NODES = ("n1", "n2")
CPUS_PER_NODE = 2  # SLURM's view: a job of 2 processes fits on one node, or one on each


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf)}
        self.pid_files = {"munged": root / "munged.pid", "slurmctld": root / "slurmctld.pid",
                          **{f"slurmd-{n}": root / f"slurmd-{n}.pid" for n in NODES}}

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.sock"
        subprocess.run(["munged", "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--pid-file={self.pid_files['munged']}", f"--log-file={r / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'munge.seed'}"], check=True, env=self.env)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
                          "RealMemory=4000 State=UNKNOWN" for n, port in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=restorertest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
# a job step's credential lives 10 s (a busy machine launches a step well within it), and a requeued
# job waits as long before it may start again (a real cluster's default: 120 s)
AuthInfo=socket={sock},cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
# the schedulers' passes every second (defaults 30 and 60 s): a requeued job starts once its wait is over
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for n in NODES:  # the absolute config path: slurmd passes it on to jobs as SLURM_CONF
            (r / "spool" / n).mkdir(parents=True, exist_ok=True)
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", n], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split() != ["idle"] * len(NODES):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test SLURM node never became idle; logs in {r}")
            time.sleep(0.5)  # polling the controller's state, not guessing
        return self

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """A SLURM command; `env` is added to its environment (sbatch --export=ALL passes it to the job)."""
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env | (env or {}), check=check, timeout=60)

    def job_state(self, job_id: str) -> dict:
        """scontrol's fields for a job (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    @staticmethod
    def job_pids(job_id: str, node: str) -> list[int]:
        """The processes of job `job_id` on `node` (torchrun, the trainer's ranks, their loader
        workers): those whose environment says so (SLURM puts SLURM_JOB_ID and SLURMD_NODENAME in
        every task's). Killing them is what a lost node does to the job."""
        want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURMD_NODENAME={node}".encode()}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """SIGTERM to every daemon at once, then wait for each (SIGKILL after 20 s): a slurmd takes a
        few seconds to shut down, and the test cluster's state is thrown away."""
        pids = []
        for name in (*(f"slurmd-{n}" for n in NODES), "slurmctld", "munged"):
            try:
                pid = int(self.pid_files[name].read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            pids.append(pid)
        deadline = time.monotonic() + 20
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
