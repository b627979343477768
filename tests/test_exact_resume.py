"""A run that stops is the run that goes on: stopped at any step (SIGTERM, Ctrl-C, a kill after a
checkpoint) and resumed, a run ends with the weights, EMA and optimizer state of the uninterrupted run,
bit for bit; resumed on another number of ranks it trains on the same samples (data.trace says which
image and patch every slot of every step held) and ends within float tolerance of it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (assert_ok, descendants, events, load_state, metrics, run_cmd, train_cmd, train_env, train_here,
                     wait_for)
from restorer.formats.config import DataConfig
from restorer.data.patches import PatchSpec
from restorer.train.loader import train_loader

# a cosine schedule, an EMA, every step traced; no validation (it changes no weight)
RUN = ("log.val_every=0", "optim.ema=0.9", "data.trace=true", "checkpoint.every=1000")


def trace(out: Path) -> dict[int, list]:
    """trace.jsonl's samples of each step (a step done again after a resume: its last line)."""
    steps = {}
    for line in (out / "trace.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["samples"]
    return steps


def assert_same_state(a: Path, b: Path, exact: bool = True) -> None:
    """The two runs' last.pt: the same step, weights, EMA and optimizer moments (bit for bit, or to 1e-5)."""
    x, y = load_state(a / "last.pt"), load_state(b / "last.pt")
    assert x["step"] == y["step"]
    same = torch.equal if exact else (lambda u, v: torch.allclose(u, v, atol=1e-5, rtol=0))
    for key in ("model", "ema"):
        assert x[key].keys() == y[key].keys()
        differ = [k for k in x[key] if not same(x[key][k], y[key][k])]
        assert not differ, (key, differ[:3])
    ox, oy = x["optimizer"]["state"], y["optimizer"]["state"]
    assert ox.keys() == oy.keys()
    assert all(same(ox[i][k], oy[i][k]) for i in ox for k in ox[i] if isinstance(ox[i][k], torch.Tensor))


@pytest.fixture
def stop_after(monkeypatch):
    """In this process: the trainer sends itself SIGTERM after each of the given steps it trains."""
    import restorer.train.loop as train

    step_once = train.Trainer.step
    when: list[int] = []

    def signalling(self, batches):
        step_once(self, batches)
        if self.state.step in when:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "step", signalling)
    return when


@pytest.mark.parametrize("workers", [0, 2])
def test_three_stops_at_random_steps_end_bit_identical(shards, tmp_path, stop_after, workers):
    args = (*RUN, "train.max_steps=20", f"data.workers={workers}")
    assert_ok(train_here(shards, tmp_path / "whole", *args))
    # a random step in each of three windows: a stop is agreed a step or two after its signal
    stop_after.extend(int(np.random.default_rng(workers).integers(a, a + 4)) for a in (2, 7, 12))
    stops = []
    for _ in range(6):
        p = train_here(shards, tmp_path / "stopped", *args)
        assert_ok(p)
        if "stopped by SIGTERM" not in p.stderr:
            break
        stops.append(metrics(tmp_path / "stopped")[-1]["step"])
    assert len(stops) == 3 and len(set(stops)) == 3, (stop_after, stops)
    assert events(tmp_path / "stopped") == ["start", "stopped", "resume", "stopped", "resume", "stopped", "resume",
                                            "finished"]
    assert trace(tmp_path / "stopped") == trace(tmp_path / "whole")  # the same image and patch in every slot
    assert_same_state(tmp_path / "whole", tmp_path / "stopped")


@pytest.fixture
def one_thread():
    """This process computes as the trainer's processes do (train_env: OMP_NUM_THREADS=1): a sum over
    two threads rounds otherwise, and a run resumed in another process would differ in its last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_kill_after_a_checkpoint_resumes_to_the_same_weights(shards, tmp_path, one_thread):
    """kill -9 at step 9 with last.pt of step 6: steps 7-9 are trained again, and come out the same."""
    args = (*RUN, "train.max_steps=12", "data.workers=1")
    assert_ok(train_here(shards, tmp_path / "whole", *args))
    out = tmp_path / "killed"
    cmd = train_cmd(0, shards, out, *args[:-1], "checkpoint.every=6", "data.workers=1")
    env = train_env({"rank": 0, "hold_after_step": 9})
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        for line in proc.stdout:  # the run holds after step 9: it cannot finish before it is killed
            if "holding after step 9" in line:
                break
        os.killpg(proc.pid, signal.SIGKILL)
    assert load_state(out / "last.pt")["step"] == 6
    p = train_here(shards, out, *args)
    assert_ok(p)
    assert "at step 6" in p.stderr
    assert trace(out) == trace(tmp_path / "whole")
    assert_same_state(tmp_path / "whole", out)


def test_the_stream_is_the_same_whatever_the_ranks_workers_and_accumulation(shards):
    """The loader alone: a global batch of 8 made by 1 rank x 8, 1 rank x 4 x 2 accumulated, 2 ranks x 4 with
    2 workers, 4 ranks x 2 (4 -> 2 -> 1): the same (image, patch) in every slot, the same pixels; and a loader
    started at step 5 gives what the whole one gives from step 5 on."""
    cfg = DataConfig(shards=str(shards), workers=0, patches_per_image=4, shuffle_buffer=8, patch=PatchSpec(size=32))

    def run(world: int, batch: int, accum: int, workers: int = 0, step: int = 0, steps: int = 12):
        slots, pixels = [], []
        for rank in range(world):
            loader = train_loader(DataConfig(**{**cfg.__dict__, "workers": workers, "trace": True}), batch_size=batch,
                                  seed=3, rank=rank, world_size=world, grad_accum=accum, step=step, steps=steps)
            got = [x.numpy().copy() for x, _, _ in loader]
            ids = np.concatenate(loader.take_traced())
            slots.append(ids.reshape(steps, batch * accum, 3))
            pixels.append(np.stack(got).reshape(steps, batch * accum, *got[0].shape[1:]))
        return np.concatenate(slots, axis=1), np.concatenate(pixels, axis=1)

    whole, whole_pixels = run(1, 8, 1)
    assert sorted(whole[0, :, 0].tolist()) == list(range(8))  # lane numbers: every slot of the global batch
    for world, batch, accum, workers in ((1, 4, 2, 0), (2, 4, 1, 2), (4, 2, 1, 0), (2, 2, 2, 1)):
        slots, pixels = run(world, batch, accum, workers)
        np.testing.assert_array_equal(slots, whole)
        np.testing.assert_array_equal(pixels, whole_pixels)
    later, later_pixels = run(2, 4, 1, 2, step=5, steps=7)
    np.testing.assert_array_equal(later, whole[5:])
    np.testing.assert_array_equal(later_pixels, whole_pixels[5:])


# ----------------------------------------------------------------------------- real processes, other worlds


def _stopped_at(out: Path) -> int:
    return [m for m in metrics(out) if m.get("event") == "stopped"][-1]["step"]


# the uninterrupted run every test of another world or of two ranks compares with: 2 ranks x 2 patches
# (tests/helpers TINY), 12 steps, a checkpoint every 2. The worker count is not part of the stream (a
# test of 2 workers compares with it too), nor are the checkpoints.
WHOLE = (*RUN, "train.max_steps=12", "data.workers=1", "checkpoint.every=2")


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert_ok(run_cmd(train_cmd(2, shards, out, *WHOLE)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumed_on_another_number_of_ranks_trains_on_the_same_samples(shards, tmp_path, whole, stop_after,
                                                                             before, after):
    """The global batch of 4: 2 ranks x 2, or 1 rank x 2 x 2 accumulated. The one-rank part of each run
    is trained in this process (stopped by stop_after), the two-rank part by torchrun."""
    sized = {1: ("train.grad_accum=2",), 2: ()}[before]  # (the first run's settings, a user's: kept or not)
    out = tmp_path / "moved"
    if before == 2:
        assert_ok(run_cmd(train_cmd(2, shards, out, *WHOLE), fault={"rank": 0, "signal_after_steps": [5]}))
    else:
        stop_after.append(5)
        assert_ok(train_here(shards, out, *WHOLE, *sized))
    stopped = _stopped_at(out)
    assert 5 <= stopped < 12
    # the same command on the other world
    p = run_cmd(train_cmd(2, shards, out, *WHOLE, *sized)) if after == 2 else train_here(shards, out, *WHOLE)
    assert_ok(p)
    kept = [line for line in p.stderr.splitlines() if "global batch of 4 patches a step is kept" in line]
    assert len(kept) == 1 and f"world size {before} -> {after}" in kept[0], p.stderr[-3000:]
    resumed = [m for m in metrics(out) if m.get("event") == "resume"][-1]
    assert resumed["world_size"] == after and resumed["global_batch"] == 4 and resumed["step"] == stopped
    assert resumed["steps_per_epoch"] == metrics(whole)[0]["steps_per_epoch"]
    assert trace(out) == trace(whole)
    assert_same_state(whole, out, exact=False)


@pytest.mark.slow
def test_two_ranks_stopped_and_resumed_end_bit_identical(shards, tmp_path, whole):
    """Rank 1 signals itself after step 6: every rank stops at the step they agree on, and the run resumed on
    two ranks (2 workers each, where `whole` had 1) ends as `whole` did. (Several stops in a row: test_three_
    stops_at_random_steps_end_bit_identical, in one process.)"""
    out = tmp_path / "stopped"
    for _ in range(2):
        p = run_cmd(train_cmd(2, shards, out, *WHOLE, "data.workers=2"), fault={"rank": 1, "signal_after_steps": [6]})
        assert_ok(p)
    assert events(out) == ["start", "stopped", "resume", "finished"]
    assert trace(out) == trace(whole)
    assert_same_state(whole, out)


def test_a_global_batch_the_new_world_cannot_keep_is_one_line_with_values_that_work(base_run, shards):
    """base_run trained 1 rank x 2 (tests/helpers TINY): on 1 rank with batch_size 3 no accumulation makes 2."""
    p = train_here(shards, base_run, "train.max_steps=6", "train.batch_size=3")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "global batch is 2 patches a step" in p.stderr and "train.batch_size=2 train.grad_accum=1" in p.stderr


@pytest.mark.slow
def test_ctrl_c_during_validation_is_a_stop_every_rank_agrees_on(shards, tmp_path):
    """Ctrl-C in a terminal signals every process of the job (torchrun, the ranks, their workers): rank 0
    saves the step it reached and says so once; nobody prints a traceback of its own."""
    out = tmp_path / "run"
    cmd = train_cmd(2, shards, out, "train.max_steps=400", "log.val_every=4", "data.val_qualities=[10,30,50,70,90]",
                    "data.workers=1")
    log = tmp_path / "log"
    with open(log, "w") as f, subprocess.Popen(cmd, env=train_env(), stdout=f, stderr=subprocess.STDOUT,
                                               start_new_session=True) as proc:
        wait_for(lambda: "step 4: validating" in log.read_text(), proc, "a validation under way", log=log)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        t = time.monotonic()
        proc.wait(timeout=120)
        seconds = time.monotonic() - t
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("restorer train: stopped by SIGINT")]
    assert len(stopped) == 1, text[-3000:]
    assert "restorer train: interrupted" not in text and "KeyboardInterrupt" not in text.split("torch.distributed")[0]
    assert load_state(out / "last.pt")["step"] == _stopped_at(out) >= 4
    assert seconds < 20, f"{seconds:.0f} s from Ctrl-C to the end"


@pytest.mark.slow
def test_elastic_torchrun_survives_a_lost_node_and_goes_on_sample_exact_on_fewer_ranks(shards, tmp_path, whole):
    """Two torchrun agents (two 'nodes' of one rank each, --nnodes=1:2) on one machine. The second
    agent and its rank are killed once a checkpoint is written; the first agent restarts its rank,
    which resumes from last.pt in a world of one: the same samples from there on, grad_accum 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "elastic"

    def agent(name: str, fault: dict | None, hosts_the_store: bool) -> subprocess.Popen:
        cmd = train_cmd(1, shards, out, *WHOLE)
        at = cmd.index("--standalone")
        cmd[at:at + 1] = ["--nnodes=1:2", "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                          "--rdzv-id=elastic-test", f"--rdzv-conf=last_call_timeout=4,is_host={hosts_the_store}"]
        return subprocess.Popen(cmd, env=train_env(fault), stdout=open(tmp_path / f"{name}.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    # The second agent first, waiting for the store: it joins the moment the first hosts the store, so the
    # two start as one world however slow the machine (a first agent alone for last_call_timeout would
    # start a world of one: a busy CI machine did). Its rank, whichever the rendezvous gives it, holds
    # after step 6 (checkpoints at 2, 4, 6 vouched for) until it is killed.
    second = agent("second", {"rank": "any", "hold_after_step": 6}, hosts_the_store=False)
    first = agent("first", None, hosts_the_store=True)  # it hosts the rendezvous store and stays
    try:
        while "holding after step 6" not in (tmp_path / "second.log").read_text():
            assert first.poll() is None and second.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        for pid in [second.pid, *descendants(second.pid)]:  # the node is lost: its agent, rank and workers at
            os.kill(pid, signal.SIGKILL)  # once (torchrun starts its ranks in sessions of their own)
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-4000:]
    finally:  # whatever happened: no agent, rank or worker is left (ranks run in sessions of their own)
        for proc in (first, second):
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "first.log").read_text()
    assert "lost the other ranks" in log and "world size 2 -> 1" in log, log[-4000:]
    starts = [m for m in metrics(out) if m.get("event") in ("start", "resume")]
    assert [(m["world_size"], m["global_batch"]) for m in starts] == [(2, 4), (1, 4)]  # 2 ranks x 2, 1 x 2 x 2
    assert starts[-1]["step"] >= 4 and events(out)[-1] == "finished"
    assert trace(out) == trace(whole)
    assert_same_state(whole, out, exact=False)
