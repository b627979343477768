"""The checks a run makes before any work, on every rank, with the verdicts gathered: the shards, the
shared memory the loader's batch rings need, and the toolchain torch.compile needs. A failure is one
ConfigError line (exit 2) on every rank: a rank that sees another disk fails the run, not hangs it.
`python -m restorer slurm check` runs the same data check on a login node."""

from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
from typing import Callable, Optional

from restorer.base.errors import RestorerError
from restorer.cluster import dist
from restorer.formats.config import Config, ConfigError
from restorer.data.manifest import ManifestError, check_shards
from restorer.infer.shipped import weights_source
from restorer.train.loader import http_settings, ring_bytes, shm_problem, split_urls, steps_per_epoch
from restorer.train.trackers import tracker_problem


VERIFY_WAIT_S = 7 * 24 * 3600  # how long ranks wait for each other's sha256 pass: as long as it takes


def check_data(cfg: Config, hash_share: Optional[tuple[int, int]] = (0, 1)) -> None:
    """Fail before any work if the shards cannot be used (ConfigError: one line, exit 2): the
    manifest, every shard's presence and size, and with data.verify the sha256 of the shards of
    `hash_share` (i, n): every n-th from the i-th (None: none)."""
    try:
        urls = split_urls(cfg.data, "train")
        if not urls:
            raise ConfigError("data: no training shards (the manifest's train split is empty)")
        if any(u.startswith(("http://", "https://")) for u in [*urls, *split_urls(cfg.data, "val")]):
            try:
                http_settings()  # RESTORER_HTTP_STALL_S / _RETRIES / _MIN_RATE: a bad value fails here, not in every worker
            except ValueError as e:
                raise ConfigError(str(e)) from None
        steps_per_epoch(cfg.data, cfg.train.batch_size, 1)
        if cfg.data.shards:
            check_shards(cfg.data.shards, verify=cfg.data.verify and hash_share is not None, share=hash_share or (0, 1))
    except ManifestError as e:
        raise ConfigError(f"data.shards: {e}") from None


def local_ranks() -> int:
    """Trainer processes on this node (torchrun's LOCAL_WORLD_SIZE, srun's SLURM_NTASKS_PER_NODE)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        with contextlib.suppress(ValueError):
            return max(int(os.environ.get(name, "").split("(")[0]), 1)
    return 1


def check_shared_memory(cfg: Config, ranks_on_node: int, shm: str = "/dev/shm") -> None:
    """The workers' batch rings live in shared memory; a container's default /dev/shm (64 MB) holds
    far less than gpu.yaml needs. ConfigError (one line) naming what to change, before any work."""
    need = ring_bytes(cfg.data, cfg.train.batch_size, cfg.train.grad_accum) * ranks_on_node
    try:
        st = os.statvfs(shm)
    except OSError:
        return  # no /dev/shm to measure (not Linux): torch picks its own shared memory
    problem = shm_problem(need, st.f_bavail * st.f_frsize, cfg.data.workers)
    if problem:
        raise ConfigError(problem)


def compile_problem(device_type: str, which=shutil.which, include_dir: Optional[str] = None) -> Optional[str]:
    """Why torch.compile cannot work here, or None. Inductor compiles what it generates: Triton's
    CUDA kernels need a C compiler and Python's headers on the node, CPU kernels a C++ compiler."""
    compilers = ("cc", "gcc", "clang") if device_type == "cuda" else ("c++", "g++", "clang++")
    if not any(which(c) for c in compilers):
        return f"no C{'' if device_type == 'cuda' else '++'} compiler ({', '.join(compilers)}) on PATH"
    include_dir = include_dir if include_dir is not None else sysconfig.get_paths().get("include", "")
    if not os.path.isfile(os.path.join(include_dir, "Python.h")):
        return f"no Python headers (Python.h in {include_dir}; a python3-dev package)"
    return None


def check_init_from_place(cfg: Config) -> None:
    """train.init_from may not lie in train.out_dir: a fresh run there (overwrite, or a first attempt
    started again) deletes the run's files before it would read it. Checked before anything is."""
    if cfg.train.init_from:
        source, out = os.path.abspath(weights_source(cfg.train.init_from)), os.path.abspath(cfg.train.out_dir)
        if os.path.commonpath([source, out]) == out:
            raise ConfigError(f"train.init_from: {cfg.train.init_from} is in train.out_dir {cfg.train.out_dir}, "
                              "whose files a fresh run there replaces: copy it out first (or resume that run)")


def init_weights(cfg: Config) -> dict:
    """The weights train.init_from names, for a run that starts fresh, read once: ConfigError (one
    line, exit 2) for a file this rank cannot read, or of another network than the config trains (the
    comparison a resume makes). A resume does not read it."""
    from restorer.infer.inference import network_weights

    try:
        spec, weights = network_weights(weights_source(cfg.train.init_from))
    except RestorerError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    if spec != cfg.network():
        raise ConfigError(f"train.init_from: {cfg.train.init_from} holds {_said(spec)}, but the config trains "
                          f"{_said(cfg.network())}: set model.* and data.patch to match it")
    return weights


def _said(spec) -> str:
    options = ", ".join(f"{k}={v}" for k, v in sorted(spec.options.items()))
    return f"{spec.name} ({options}; {'luma' if spec.grayscale else f'{spec.in_channels} channels'})"


def check_trackers(cfg: Config) -> None:
    """A tracker asked for but not installed: one line naming its extra (exit 2), before any work."""
    problem = tracker_problem(cfg.log)
    if problem:
        raise ConfigError(problem)


def agreed_check(info: dist.DistInfo, check: Callable[[], None], gather: Callable[[Optional[str]], list] = dist.gather) -> None:
    """Run `check` on every rank; if it fails on any, every rank raises the first failure (rank 0
    says which rank): a rank that sees another disk fails the run, not hangs it. `gather`: how the
    verdicts are exchanged (a collective by default)."""
    try:
        check()
        error = None
    except ConfigError as e:
        error = str(e)
    errors = gather(error)
    first = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first:
        rank, message = first
        raise ConfigError(message + (f" (on rank {rank})" if rank else ""))


def start_checks(cfg: Config, info: dist.DistInfo) -> None:
    """Everything checked before a run starts, agreed by all ranks: the data and the shared memory
    of this node's ranks, then (data.verify) every shard's sha256, each read by one rank of the job.
    Hashing hundreds of GB on a shared file system takes longer than a collective may wait (NCCL's
    10 minutes): its verdicts are exchanged through the rendezvous store, with no such limit."""
    agreed_check(info, lambda: (check_data(cfg, hash_share=None), check_shared_memory(cfg, local_ranks()),
                                check_trackers(cfg), check_init_from_place(cfg)))
    if cfg.data.verify and cfg.data.shards:
        agreed_check(info, lambda: check_data(cfg, hash_share=(info.rank, info.world_size)),
                     gather=lambda error: dist.gather_by_store("restorer/verify", error, VERIFY_WAIT_S))
