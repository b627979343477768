"""The GPU and cluster path's decisions, as pure functions run on the CPU: which CUDA device a
process takes, what a SLURM job runs with, whether the batch rings fit in /dev/shm, whether
torch.compile can work; and the trainer acting on the last two."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import REPO, run_cmd, train_cmd, train_env
from restorer.formats.config import load_config
from restorer.train.loader import ring_bytes, shm_problem
from restorer.cluster.dist import cuda_device_index, rank_env
from restorer.base.errors import LaunchError
from restorer.cluster.slurm import make_plan, shell, slurm_master_addr, slurm_port
from restorer.train.checks import compile_problem


def test_each_process_takes_the_gpu_it_can_see():
    assert [cuda_device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun: all GPUs visible
    assert [cuda_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # srun --gpus-per-task=1: its own only
    with pytest.raises(LaunchError, match="local rank 4 but only 4 CUDA devices"):
        cuda_device_index(4, 4)
    with pytest.raises(LaunchError, match="no CUDA device is visible"):
        cuda_device_index(0, 0)
    with pytest.raises(LaunchError, match="4 processes on this node share the one visible CUDA device"):
        cuda_device_index(2, 1, sharing=4)  # torchrun with 4 processes, CUDA_VISIBLE_DEVICES=0


def test_ranks_come_from_torchrun_then_srun_and_a_batch_step_is_refused():
    assert rank_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == (3, 8, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    assert rank_env(srun) == (5, 8, 1)
    with pytest.raises(LaunchError, match="not started by srun"):
        rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"})
    assert rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)  # one task: a world of one


def test_a_slurm_job_runs_one_process_per_allocated_gpu_and_shares_its_cpus():
    gpu = make_plan({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_ID": "7", "MASTER_ADDR": "n1"})
    assert (gpu.nproc_per_node, gpu.workers, gpu.threads) == (4, 7, 1)
    # SLURM sets CUDA_VISIBLE_DEVICES to the allocation: two of a node's eight GPUs
    assert make_plan({"CUDA_VISIBLE_DEVICES": "4,6", "SLURM_CPUS_PER_TASK": "16", "MASTER_ADDR": "n1"}).nproc_per_node == 2
    cpu = make_plan({"SLURM_CPUS_PER_TASK": "8", "MASTER_ADDR": "n1"})
    assert (cpu.nproc_per_node, cpu.workers, cpu.threads) == (1, 4, 4)  # threads too, not OMP_NUM_THREADS=1
    assert make_plan({"SLURM_CPUS_PER_TASK": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "n1"}).workers == 0
    # job ids 20000 apart used to share a port
    assert len({slurm_port(j) for j in (1000, 21000, 41000, 61000)}) == 4
    # never among the ports the kernel hands out to other processes (this machine's range, else Linux's default)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low, high = map(int, ephemeral.read_text().split()) if ephemeral.exists() else (32768, 60999)
    ports = {slurm_port(j) for j in range(5000)}
    assert len(ports) > 3500 and all(1024 < p < low or p > high for p in ports), (low, high)
    out = subprocess.run(["bash", "-c", 'eval "$(cat)"; echo $NPROC_PER_NODE $WORKERS_PER_RANK $MASTER_ADDR $MASTER_PORT'],
                         input=shell(gpu), capture_output=True, text=True)
    assert out.stdout.split() == ["4", "7", "n1", str(slurm_port(7))]


def _scontrol(node_addr: str):
    """What scontrol prints for a two-node job whose node names are not host names (n1, n2)."""
    def run(cmd, **kw):
        out = {"hostnames": "n1\nn2\n", "node": f"NodeName=n1 Arch=x86_64 NodeAddr={node_addr} NodeHostName=vm"}[cmd[2]]
        return subprocess.CompletedProcess(cmd, 0, out, "")
    return run


def test_the_rendezvous_is_the_first_nodes_address_never_a_silent_loopback():
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    assert slurm_master_addr(env, run=_scontrol("127.0.0.1")) == "127.0.0.1"  # n1's NodeAddr, not "n1"

    def no_scontrol(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", "scontrol")

    with pytest.raises(LaunchError, match=r"cannot find the first node of this 2-node job \(n\[1-2\]\)") as e:
        slurm_master_addr(env, run=no_scontrol)
    assert "\n" not in str(e.value)
    with pytest.raises(LaunchError, match="the first node n1's address 'n1.invalid' does not resolve"):
        slurm_master_addr(env, run=_scontrol("n1.invalid"))
    assert slurm_master_addr({"SLURM_JOB_NUM_NODES": "1"}, run=no_scontrol) == "127.0.0.1"  # one node: itself


def test_a_plan_with_few_loader_workers_a_gpu_says_so():
    few = make_plan({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "8", "MASTER_ADDR": "h"})
    assert few.workers == 1 and "leave 1 loader worker(s) a GPU" in few.warning() and "--cpus-per-task=20" in few.warning()
    assert make_plan({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "MASTER_ADDR": "h"}).warning() is None
    assert make_plan({"SLURM_CPUS_PER_TASK": "2", "MASTER_ADDR": "h"}).warning() is None  # no GPU to starve


def test_the_batch_rings_must_fit_in_shared_memory():
    cfg = load_config(str(REPO / "configs" / "gpu.yaml"), ["data.shards=x"])
    per_rank = ring_bytes(cfg.data, cfg.train.batch_size)
    # a worker's item is its share of the rank's patches of a step (64 / 8 workers = 8); 128 patches in
    # flight a worker = 16 items, and 3 spare slots: 19 x batch x (input and target pixels + the input's
    # float32 quality + its lane, image and patch numbers)
    assert (cfg.train.batch_size, cfg.data.workers) == (64, 8)
    assert per_rank == 19 * cfg.train.batch_size * (2 * 3 * 128 * 128 + 4 + 24)
    assert shm_problem(4 * per_rank, 64 * 2**20, cfg.data.workers).startswith(
        f"the DataLoader workers' batch rings need {4 * per_rank / 2**20:,.0f} MiB of shared memory")
    assert "--shm-size" in shm_problem(4 * per_rank, 64 * 2**20, 8) and shm_problem(per_rank, 2 * per_rank, 8) is None


def test_compile_needs_a_compiler_and_python_headers(tmp_path):
    assert compile_problem("cuda", which=lambda c: None).startswith("no C compiler")
    assert compile_problem("cpu", which=lambda c: None).startswith("no C++ compiler")
    assert "no Python headers" in compile_problem("cuda", which=lambda c: "/usr/bin/" + c, include_dir=str(tmp_path))
    (tmp_path / "Python.h").write_text("")
    assert compile_problem("cuda", which=lambda c: "/usr/bin/" + c, include_dir=str(tmp_path)) is None


@pytest.mark.slow
def test_the_trainer_runs_eager_without_a_compiler_and_refuses_a_ring_too_big(tmp_path, shards):
    env = train_env() | {"PATH": str(tmp_path)}  # no compiler to be found
    p = subprocess.run(train_cmd(0, shards, tmp_path / "run", "train.compile=true", "train.max_steps=2",
                                 "log.val_every=0"), capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "restorer train: warning: train.compile: no C++ compiler" in p.stderr and "running eager" in p.stderr
    p = run_cmd(train_cmd(0, shards, tmp_path / "big", "data.workers=2", "train.batch_size=8192", "data.patch.size=512"))
    assert p.returncode == 2 and "of shared memory on this node" in p.stderr and "Traceback" not in p.stderr
