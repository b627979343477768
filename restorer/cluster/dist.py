"""Process-group setup from torchrun's variables (or SLURM's, under srun alone), and small collectives.

One process without either is a world of one: no process group, the same code path otherwise.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from restorer.base.device import resolve_device
from restorer.base.errors import LaunchError
from restorer.cluster.slurm import env_int, slurm_master_addr, slurm_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_env(env: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's variables, else srun's (one task per GPU), else 0, 1, 0.

    SLURM's task variables without srun's step variables mean a batch script ran the trainer itself
    (`python launch/train.py` in an `sbatch --ntasks=N` script): one process that would wait for N-1
    peers that never come. That is a LaunchError.
    """
    if env_int(env, "RANK") is not None:
        return env_int(env, "RANK"), env_int(env, "WORLD_SIZE") or 1, env_int(env, "LOCAL_RANK") or 0
    tasks = env_int(env, "SLURM_NTASKS") or 1
    if env_int(env, "SLURM_PROCID") is not None and tasks > 1:
        if env_int(env, "SLURM_STEP_ID", "SLURM_STEPID") is None:
            raise LaunchError(f"this job has {tasks} SLURM tasks but this process was not started by srun: "
                              "run it as `srun python launch/train.py ...` (one task per GPU), or submit "
                              "launch/slurm/train.sbatch (torchrun per node)")
        return env_int(env, "SLURM_PROCID"), tasks, env_int(env, "SLURM_LOCALID") or 0
    return 0, 1, 0


def cuda_device_index(local_rank: int, visible: int, sharing: int = 1) -> int:
    """This process's CUDA device among the `visible` ones. torchrun (or srun with all of a node's
    GPUs per task) shows every GPU to every process: take the local rank's. srun with
    `--gpus-per-task=1` shows each task only its own GPU, as device 0. `sharing`: the processes on
    this node that see the same devices (torchrun's LOCAL_WORLD_SIZE; 1 under srun)."""
    if visible < 1:
        raise LaunchError("train.device is cuda but no CUDA device is visible to this process")
    if visible == 1 and sharing > 1:
        raise LaunchError(f"{sharing} processes on this node share the one visible CUDA device: start one "
                          "process per GPU (torchrun --nproc_per_node = the GPUs), or train.device=cpu")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchError(f"local rank {local_rank} but only {visible} CUDA devices are visible: "
                          "start at most one process per GPU on each node")
    return local_rank


def init_distributed(device: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Join the process group (nccl with CUDA, gloo otherwise) and pick this rank's device."""
    rank, world_size, local_rank = rank_env()
    use_cuda = device == "cuda" or resolve_device(device).type == "cuda"  # (no CUDA: cuda_device_index says so)
    if use_cuda:
        sharing = (env_int(os.environ, "LOCAL_WORLD_SIZE") or 1) if env_int(os.environ, "RANK") is not None else 1
        dev = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count(), sharing))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if env_int(os.environ, "RANK") is None:  # srun started every rank: give torch what torchrun would
            if "MASTER_ADDR" not in os.environ:
                os.environ["MASTER_ADDR"] = slurm_master_addr()
            os.environ.setdefault("MASTER_PORT", str(slurm_port(env_int(os.environ, "SLURM_JOB_ID") or 0)))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        timeout = datetime.timedelta(seconds=timeout_s)
        global _store
        _store = _attempt_store(world_size, rank, timeout)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, store=_store,
                                rank=rank, world_size=world_size, **({"device_id": dev} if use_cuda else {}))
    return DistInfo(rank, world_size, local_rank, dev)


_store: Optional[dist.Store] = None  # the process group's rendezvous store (gather_by_store)


def gather_by_store(key: str, obj: Any, timeout_s: float) -> list:
    """Every rank's `obj`, in rank order, exchanged through the rendezvous store instead of a
    collective: a rank may take up to `timeout_s` (hours, if it must) to post it, where a collective
    would fail after the process group's timeout (NCCL's 10 minutes by default). For work of very
    unequal length on the ranks, such as hashing shards on a shared file system."""
    if _store is None or not dist.is_initialized():
        return [obj]
    rank, world = dist.get_rank(), dist.get_world_size()
    _store.set(f"{key}/{rank}", pickle.dumps(obj))
    keys = [f"{key}/{r}" for r in range(world)]
    _store.wait(keys, datetime.timedelta(seconds=timeout_s))
    return [pickle.loads(_store.get(k)) for k in keys]


def node_name() -> str:
    """The node this process runs on, as SLURM names it (SLURMD_NODENAME), else the host's name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _attempt_store(world_size: int, rank: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, under a prefix of its own for each torchrun restart.

    torchrun's agent keeps one store across `--max_restarts` restarts; without a prefix, a restarted
    group can read the addresses the previous (dead) group published and fail to connect, or reach
    a leftover socket of a dead rank. (Seen here with gloo: "Connection reset by peer" in DDP's
    first collective after a restart.)
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout,
                          **({} if agent_store else {"multi_tenant": True}))
    return dist.PrefixStore(f"restorer/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place across ranks (a no-op in a world of one); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object; checkpoints included)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
