"""Process-group setup from torchrun's variables (or SLURM's, under srun alone), and small collectives.

One process without either is a world of one: no process group, the same code path otherwise.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None


def _slurm_master_addr() -> str:
    """The first host of the allocation: where rank 0 runs under srun."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def rank_env() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's variables, else srun's (one task per GPU), else 0, 1, 0."""
    if _env_int("RANK") is not None:
        return _env_int("RANK"), _env_int("WORLD_SIZE") or 1, _env_int("LOCAL_RANK") or 0
    if _env_int("SLURM_PROCID") is not None and (_env_int("SLURM_NTASKS") or 1) > 1:
        # srun started every rank itself: give torch.distributed what torchrun would have
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(20000 + (_env_int("SLURM_JOB_ID") or 0) % 20000))
        return _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID") or 0
    return 0, 1, 0


def init_distributed(device: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Join the process group (nccl with CUDA, gloo otherwise) and pick this rank's device."""
    rank, world_size, local_rank = rank_env()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, store=_attempt_store(world_size, rank, timeout),
                                rank=rank, world_size=world_size, **({"device_id": dev} if use_cuda else {}))
    return DistInfo(rank, world_size, local_rank, dev)


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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
