"""What a SLURM job runs with, worked out from what SLURM allocated: pure functions (the two commands
launch/slurm/train.sbatch uses are restorer.tools.slurm's).

Processes per node are the GPUs SLURM gave the node (SLURM_GPUS_ON_NODE, else the devices in
CUDA_VISIBLE_DEVICES, which SLURM sets to the allocation), never every GPU the node has; 1 on a CPU
node. Each process gets an equal share of the task's CPUs (SLURM_CPUS_PER_TASK): one for itself,
the rest for its DataLoader workers; on a CPU node the process's share also sets its threads. The
rendezvous is on the first node, at the address SLURM itself reaches it by (its NodeAddr:
slurm_master_addr); a plan that cannot find it fails in one line. It imports no torch: a job starts
its trainer seconds sooner.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from restorer.base.errors import LaunchError

WORKERS_PER_GPU = 4  # fewer loader workers a GPU than this may leave it waiting for data (bench/gpu_check.py)


@dataclass(frozen=True)
class Plan:
    nproc_per_node: int  # processes (ranks) per node
    workers: int  # DataLoader workers per rank
    threads: int  # intra-op threads per rank (OMP_NUM_THREADS)
    master_port: int
    cpus: int  # CPUs the node's task has
    gpus: int  # GPUs SLURM gave the node
    master_addr: str = "127.0.0.1"  # where the rendezvous is: the first node's address

    def warning(self) -> Optional[str]:
        """Why this plan may starve the GPUs of data, or None."""
        if self.gpus and self.workers < WORKERS_PER_GPU:
            want = self.nproc_per_node * (WORKERS_PER_GPU + 1)
            return (f"{self.cpus} CPUs for {self.nproc_per_node} GPU process(es) leave {self.workers} loader worker(s) "
                    f"a GPU (fewer than {WORKERS_PER_GPU} may leave the GPUs waiting for data): ask for "
                    f"--cpus-per-task={want} or more, if the nodes have them")
        return None


def env_int(env: Mapping[str, str], *names: str) -> int | None:
    """The first of the variables `names` set in `env`, as an int (SLURM's and torchrun's)."""
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return None


def _scontrol(*args: str, run=subprocess.run) -> str:
    out = run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout


def slurm_master_addr(env: Mapping[str, str] = os.environ, run=subprocess.run,
                      resolve=socket.getaddrinfo) -> str:
    """The address every task of a SLURM job reaches its first node by: that node's NodeAddr
    (`scontrol show node`), which is what SLURM itself uses, else its host name. Node names need not
    resolve (n1, n2 on clusters whose node names are not host names); NodeAddr does.

    LaunchError (one line) when a multi-node job cannot find it (no scontrol) or it does not resolve:
    never a silent 127.0.0.1, which on another node is that node itself. A one-node job without
    scontrol uses 127.0.0.1 (every task is on that node)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    nodes = env_int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
    try:
        first = _scontrol("show", "hostnames", nodelist, run=run).split()[0]
        fields = dict(tok.split("=", 1) for tok in _scontrol("show", "node", first, run=run).split() if "=" in tok)
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        if nodes > 1:
            raise LaunchError(f"cannot find the first node of this {nodes}-node job ({nodelist or 'no node list'}): "
                              f"scontrol failed ({e.__class__.__name__}); set MASTER_ADDR to its address") from None
        return "127.0.0.1"
    addr = fields.get("NodeAddr") or fields.get("NodeHostName") or first
    try:
        resolve(addr, None)
    except (OSError, UnicodeError):
        raise LaunchError(f"the first node {first}'s address {addr!r} does not resolve here: set NodeAddr in "
                          "slurm.conf to an address the nodes reach, or MASTER_ADDR") from None
    return addr


SLURM_PORTS = range(20000, 32768)  # under Linux's ephemeral ports (32768-60999 by default), which the
# kernel gives any process's connections and port-0 listeners: a rendezvous port there can be held by
# another process on the node, and torchrun's agent, failing to bind it, then joins that process as a
# client and fails (seen in the SLURM tests beside the rest of the suite)


def slurm_port(job_id: int) -> int:
    """A rendezvous port every task of a SLURM job derives alike, in SLURM_PORTS. A hash of the job id,
    not the id modulo the range: consecutive or regularly spaced job ids (arrays, requeues of
    neighbours) then rarely share a port on one node."""
    digest = int.from_bytes(hashlib.sha256(str(job_id).encode()).digest()[:4], "big")
    return SLURM_PORTS[digest % len(SLURM_PORTS)]


def allocated_gpus(env: Mapping[str, str]) -> int:
    """GPUs SLURM allocated on this node: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES's entries."""
    text = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if text.isdigit():
        return int(text)
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return len([d for d in visible.split(",") if d.strip()])
    return 0


def make_plan(env: Mapping[str, str]) -> Plan:
    gpus = allocated_gpus(env)
    nproc = int(env["NPROC_PER_NODE"]) if env.get("NPROC_PER_NODE", "").strip() else max(gpus, 1)
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE") or 1)
    share = max(cpus // nproc, 1)
    if gpus:  # the GPU computes; the CPUs feed it: one for the rank, the rest for its workers
        workers, threads = max(share - 1, 1 if share > 1 else 0), 1
    else:  # a CPU node computes on its CPUs too: half the share for the rank's threads, half for workers
        workers = share // 2
        threads = max(share - workers, 1)
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").strip() else slurm_port(int(env.get("SLURM_JOB_ID") or 0))
    addr = env["MASTER_ADDR"] if env.get("MASTER_ADDR", "").strip() else slurm_master_addr(env)
    return Plan(nproc, workers, threads, port, cpus, gpus, addr)


def shell(plan: Plan) -> str:
    return "\n".join(f"{k}={shlex.quote(str(v))}" for k, v in (
        ("NPROC_PER_NODE", plan.nproc_per_node), ("WORKERS_PER_RANK", plan.workers),
        ("THREADS_PER_RANK", plan.threads), ("MASTER_ADDR", plan.master_addr), ("MASTER_PORT", plan.master_port),
        ("TASK_CPUS", plan.cpus), ("NODE_GPUS", plan.gpus)))
