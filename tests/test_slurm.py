"""SLURM jobs on a real controller and compute daemon (started by the fixture), CPU and gloo."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from helpers import REPO, TINY, load_state, logged_step, metrics, train_env, train_lines

_metrics, _train_lines = metrics, train_lines

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why}")
        pytest.skip(why)
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def no_job_left(cluster):
    """A test that failed while its job ran cancels the job: the next test gets the nodes, not a queue
    behind a job that never ends (one held after its requeue once kept a CI run waiting)."""
    yield
    jobs = cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", *{j.split("_")[0] for j in jobs}, check=False)


def _args(shards: Path, out: Path, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "cpu.yaml"), f"data.shards={shards}", f"train.out_dir={out}",
            *TINY, "log.val_every=0", *overrides]


def _sbatch(cluster, out: Path, *args: str, nodes: int = 1, nproc: int = 2, fault: dict | None = None) -> str:
    """launch/slurm/train.sbatch on `nodes` nodes, `nproc` ranks a node (with a test fault: helpers.train_env)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in train_env(fault).items() if k in ("RESTORER_TEST_FAULT", "PYTHONPATH")} if fault else None
    p = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--cpus-per-task=2", f"--output={out}/slurm-%j.out",
                    f"--export=ALL,NPROC_PER_NODE={nproc},PYTHON={sys.executable},RESTORER_DIR={REPO}",
                    str(REPO / "launch" / "slurm" / "train.sbatch"), *args, env=env)
    return p.stdout.strip().split(";")[0]


def _log(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.glob("slurm-*.out")))


def _wait(cluster, job: str, until, what: str, limit: float = 240, out: Path | None = None) -> dict:
    """Poll the controller until `until(state)`; a job that fails first fails the test with its log.
    `limit` only ends a wait that would hang: what the tests wait for are events, not durations."""
    deadline = time.monotonic() + limit
    while True:
        state = cluster.job_state(job)
        if until(state):
            return state
        log = f"\n{_log(out)[-6000:]}" if out is not None else ""
        assert state.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), f"{state}{log}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {state}{log}"
        time.sleep(0.5)  # polling the controller, not guessing a duration


def test_an_array_job_gives_each_task_its_own_run_folder(cluster, shards, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    p = cluster.run("sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--output={out}/slurm-%A_%a.out",
                    f"--export=ALL,NPROC_PER_NODE=1,PYTHON={sys.executable},RESTORER_DIR={REPO}",
                    str(REPO / "launch" / "slurm" / "train.sbatch"),
                    *_args(shards, out / "run-%a", "train.max_steps=2", "train.seed=1%a"))
    job = p.stdout.strip().split(";")[0]
    for task in (0, 1):
        state = _wait(cluster, f"{job}_{task}", lambda s: s.get("JobState") == "COMPLETED", f"array task {task}",
                      out=out)
        assert state["ExitCode"] == "0:0", _log(out)
    for task in (0, 1):  # %a became the task id in every argument: its own folder, its own settings
        run = out / f"run-{task}"
        assert load_state(run / "last.pt")["step"] == 2
        assert load_state(run / "last.pt")["config"]["train"]["seed"] == 10 + task
    assert not list(out.glob("run-%a*"))


def test_srun_one_task_per_rank_without_torchrun(cluster, shards, tmp_path):
    out = tmp_path / "run"
    p = cluster.run("srun", "--ntasks=2", "--cpus-per-task=1", f"--chdir={REPO}", "--export=ALL,OMP_NUM_THREADS=1",
                    sys.executable, str(REPO / "launch" / "train.py"), *_args(shards, out, "train.max_steps=6"),
                    check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    start = _metrics(out)[0]
    assert start["world_size"] == 2 and start["event"] == "start"
    assert [m["step"] for m in _train_lines(out)] == [2, 4, 6]
    assert load_state(out / "last.pt")["step"] == 6


def test_a_batch_script_running_the_trainer_without_srun_is_told_how(cluster, shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cmd = " ".join([sys.executable, str(REPO / "launch" / "train.py"), *_args(shards, out / "x", "train.max_steps=2")])
    p = cluster.run("sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={out}/slurm-%j.out",
                    f"--chdir={REPO}", f"--wrap={cmd}")
    job = p.stdout.strip().split(";")[0]
    state = _wait(cluster, job, lambda s: s.get("JobState") in ("COMPLETED", "FAILED"), "the job to end", limit=120)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", state
    errors = [line for line in _log(out).splitlines() if line.startswith("restorer train: error:")]
    assert len(errors) == 1 and "not started by srun" in errors[0], _log(out)


# ----------------------------------------------------------------------------- two nodes


def test_sbatch_trains_on_one_node_and_on_two_nodes_alike(cluster, shards, tmp_path):
    common = ("train.max_steps=6", "checkpoint.every=1000")
    runs = {}
    for nodes, nproc in ((1, 2), (2, 1)):
        out = tmp_path / f"{nodes}x{nproc}"
        job = _sbatch(cluster, out, *_args(shards, out, *common), nodes=nodes, nproc=nproc)
        state = _wait(cluster, job, lambda s: s.get("JobState") == "COMPLETED", f"the {nodes}-node job", out=out)
        assert state["ExitCode"] == "0:0", _log(out)
        log = _log(out)
        assert f"restorer: job {job} start" in log and f"restart 0: {nodes} node(s) x {nproc} process(es)" in log
        assert f"job {job} ended with exit code 0" in log
        assert load_state(out / "last.pt")["step"] == 6 and _metrics(out)[0]["world_size"] == 2
        runs[nodes] = out
    one, two = runs[1], runs[2]
    start = _metrics(two)[0]
    assert start["world_size"] == 2 and sorted(start["nodes"]) == ["n1", "n2"]  # global ranks 0 and 1, a node each
    assert len(set(_metrics(one)[0]["nodes"])) == 1
    log = _log(two)
    assert "2 node(s) x 1 process(es)" in log and "rendezvous 127.0.0.1:" in log  # n1's NodeAddr: "n1" does not resolve
    # only global rank 0 wrote: every step once; the same data split by global rank, the same result
    assert [m["step"] for m in _train_lines(two)] == [m["step"] for m in _train_lines(one)] == [2, 4, 6]
    a, b = load_state(one / "last.pt"), load_state(two / "last.pt")
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])
    assert [m["loss"] for m in _train_lines(one)] == pytest.approx([m["loss"] for m in _train_lines(two)], rel=1e-4)


def test_usr1_before_the_time_limit_or_a_preemption_requeues_a_two_node_job_and_it_resumes(cluster, shards, tmp_path):
    out = tmp_path / "run"
    # rank 0 holds after step 6 until the stop reaches it: the job cannot end before it is signalled
    job = _sbatch(cluster, out, *_args(shards, out, "train.max_steps=60", "checkpoint.every=1000"), nodes=2, nproc=1,
                  fault={"rank": 0, "hold_after_step": 6})
    _wait(cluster, job, lambda s: "holding after step 6" in _log(out), "training to reach step 6", out=out)
    # what --signal=B:USR1@N does before the time limit, and a preemption: USR1 to the batch shell only
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    state = _wait(cluster, job, lambda s: s.get("JobState") == "COMPLETED" and s.get("Restarts") == "1",
                  "the requeued job to complete", out=out)
    assert state["ExitCode"] == "0:0", _log(out)
    log = _log(out)
    assert f"requeueing job {job}" in log and "restart 1: 2 node(s)" in log
    assert f"job {job} stopped for its requeue" in log and "resumes from last.pt" in log
    events = [m for m in _metrics(out) if "event" in m]
    assert [e["event"] for e in events] == ["start", "stopped", "resume", "finished"]
    assert sorted(events[0]["nodes"]) == sorted(events[2]["nodes"]) == ["n1", "n2"]  # (the rendezvous orders them)
    stopped = events[1]["step"]
    assert 6 <= stopped < 60 and events[2]["step"] == stopped  # resumed where it saved
    steps = [m["step"] for m in _train_lines(out)]
    assert len(steps) == len(set(steps)) and steps[-1] == 60  # no step done twice
    assert load_state(out / "last.pt")["step"] == 60


def test_a_lost_node_ends_the_other_in_one_line_and_the_next_job_resumes(cluster, shards, tmp_path):
    out = tmp_path / "run"
    args = _args(shards, out, "train.max_steps=400", "checkpoint.every=2", "train.stop_grace_s=10")
    job = _sbatch(cluster, out, *args, nodes=2, nproc=1)
    _wait(cluster, job, lambda s: logged_step(out) >= 6, "training to reach step 6", out=out)
    pids = cluster.job_pids(job, "n2")
    assert pids, "no process of the job on n2"
    for pid in pids:  # the node is lost: every process of the job on it dies at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    t = time.monotonic()
    state = _wait(cluster, job, lambda s: s.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"), "the job to end",
                  limit=10 + 30 + 20)
    assert time.monotonic() - t < 10 + 30, "n1 did not end within train.stop_grace_s + 30 s"
    errors = [line for line in _log(out).splitlines() if line.startswith("restorer train: error:")]
    lost = _metrics(out)[0]["nodes"].index("n2")  # the rendezvous decides which global rank n2 runs
    assert len(errors) == 1 and f"(rank {lost} on node n2)" in errors[0], _log(out)
    saved = load_state(out / "last.pt")["step"]
    assert saved >= 2  # the last periodic checkpoint a later step vouched for
    job = _sbatch(cluster, out, *_args(shards, out, f"train.max_steps={saved + 4}", "checkpoint.every=2"), nodes=2, nproc=1)
    state = _wait(cluster, job, lambda s: s.get("JobState") == "COMPLETED", "the next job", out=out)
    assert state["ExitCode"] == "0:0", _log(out)
    resumed = [m for m in _metrics(out) if m.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] == saved
