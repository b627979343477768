"""The trainer, for real: torchrun with gloo on the CPU, tiny shards, real signals and kills."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, assert_ok, load_state, metrics, pack_photos, run_cmd, train_cmd, train_lines
from restorer.checkpoint import read_checkpoint
from restorer.models import NetworkSpec


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return pack_photos(tmp_path_factory.mktemp("train"), 10, maxcount=3)  # 8 train images in 3 shards


# ----------------------------------------------------------------------------- fast: one process


def test_bad_config_and_missing_shards_exit_2_with_one_line(tmp_path, shards):
    for overrides, message in (
        (["train.max_step=5"], "unknown key train.max_step"),
        ([f"data.shards={tmp_path}/nothing"], "no shard manifest at"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
    ):
        p = run_cmd(train_cmd(0, shards, tmp_path / "out", *overrides))
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("train: error: ") and p.stderr.count("\n") == 1, p.stderr
        assert message in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "out").exists()


def test_one_process_trains_validates_and_checkpoints(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(run_cmd(train_cmd(0, shards, out, "train.max_steps=6", "log.val_every=3", "checkpoint.every=3")))
    state = load_state(out / "last.pt")  # the file's contract: a dict that torch.load(weights_only=True) reads
    assert state["step"] == 6 and state["format"] == "restorer-checkpoint" and state["version"] == 2
    assert state["network"]["name"] == "unet" and state["network"]["options"]["conditioning"] == "decoder"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    model = NetworkSpec.from_dict(state["network"]).build()
    model.load_state_dict(state["model"])  # the network rebuilds from the checkpoint alone
    vals = [m for m in metrics(out) if "val_psnr" in m]
    assert [v["step"] for v in vals] == [3, 6] and all(v["val_images"] == 2 for v in vals)
    assert (out / "best.pt").exists() and (out / "config.yaml").exists()
    # resuming into a run of another network is refused, not half-loaded
    p = run_cmd(train_cmd(0, shards, out, "train.max_steps=8", "model.name=dncnn"))
    assert p.returncode == 1 and "use another train.out_dir, or train.resume=false" in p.stderr


def test_the_loop_switches_work_together(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(run_cmd(train_cmd(0, shards, out, "train.max_steps=4", "train.grad_accum=2", "train.precision=bf16",
                  "train.channels_last=true", "optim.ema=0.9", "optim.schedule=cosine", "optim.warmup_steps=2",
                  "optim.grad_clip=0.5", "optim.name=adamw", "log.val_every=2", "log.every=1",
                  "optim.loss=charbonnier")))
    state = load_state(out / "last.pt")
    assert state["step"] == 4 and "ema" in state
    lines = train_lines(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert lines[0]["lr"] == pytest.approx(1e-3 * 0.5)  # warmup: step 1 of 2
    assert lines[0]["patches_per_s"] > 0 and all(m["nonfinite"] == 0 for m in lines)


def test_charbonnier_is_a_smooth_l1():
    from restorer.config import load_config
    from restorer.train import loss_fn

    cfg = load_config(None, ["data.shards=x", "optim.loss=charbonnier", "optim.charbonnier_eps=0.1"])
    out, y = torch.tensor([[0.5, 0.2]]), torch.tensor([[0.5, 0.6]])
    assert loss_fn(cfg)(out, y).item() == pytest.approx((0.1 + (0.4**2 + 0.01) ** 0.5) / 2)


def test_a_time_budget_ends_the_run_and_drives_the_schedule(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(run_cmd(train_cmd(0, shards, out, "train.max_minutes=0.05", "train.max_steps=0", "train.epochs=100000",
                                "optim.schedule=cosine", "log.val_every=0", "log.every=1")))
    end = metrics(out)[-1]
    assert end["event"] == "finished" and end["reason"] == "max_minutes" and 0.05 <= end["minutes"] < 0.5
    lrs = [m["lr"] for m in train_lines(out)]
    assert lrs[0] == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.2e-3  # cosine over the time spent
    assert read_checkpoint(out / "last.pt").train_seconds >= 3


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, shards):
    p = run_cmd(train_cmd(0, shards, tmp_path / "run", "train.max_steps=50", "optim.lr=1e12", "optim.loss=mse_sum",
                  "train.max_nonfinite=3", "log.val_every=0"))
    assert p.returncode == 1, p.stderr[-3000:]
    assert "non-finite steps in a row" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_ranks_learn_and_only_rank0_writes(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(run_cmd(train_cmd(2, shards, out, "train.max_steps=30", "log.val_every=0", "checkpoint.every=10",
                  "checkpoint.keep=2", "optim.lr=2e-3")))
    lines = train_lines(out)
    assert [m["step"] for m in lines] == list(range(2, 31, 2))  # one writer: no step logged twice
    first, last = lines[0]["loss"], sum(m["loss"] for m in lines[-3:]) / 3
    assert last < first, (first, last)
    events = [m["event"] for m in metrics(out) if "event" in m]
    assert events == ["start", "finished"]
    start = metrics(out)[0]
    assert start["world_size"] == 2 and start["total_steps"] == 30
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt", "step-00000020.pt", "step-00000030.pt"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert read_checkpoint(out / "last.pt").step == 30


@pytest.mark.slow
@pytest.mark.parametrize("maxcount", [3, 8])  # 3 shards, then 1 shard, for 2 ranks x 2 workers
def test_uneven_shards_never_hang(tmp_path, maxcount):
    data = pack_photos(tmp_path, 10, maxcount=maxcount)
    out = tmp_path / "run"
    # an epoch is 8 images x 8 patches / (2 per batch x 2 ranks) = 16 steps: run past one epoch
    assert_ok(run_cmd(train_cmd(2, data, out, "data.workers=2", "train.max_steps=20", "log.val_every=0"), timeout=180))
    assert read_checkpoint(out / "last.pt").step == 20
    assert metrics(out)[0]["steps_per_epoch"] == 16


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def _wait_for(cond, proc: subprocess.Popen, what: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling an observable file, not guessing a duration


def _logged_step(out: Path) -> int:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        lines = train_lines(out)
        return lines[-1]["step"] if lines else 0
    return 0


@pytest.mark.slow
def test_sigterm_saves_now_and_a_restart_resumes_to_the_same_end(tmp_path, shards):
    common = ("train.max_steps=40", "log.val_every=0", "checkpoint.every=1000", "optim.schedule=cosine",
              "optim.warmup_steps=4")
    reference = tmp_path / "reference"
    assert_ok(run_cmd(train_cmd(2, shards, reference, *common)))

    out = tmp_path / "run"
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(2, shards, out, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    _wait_for(lambda: _logged_step(out) >= 10, proc, "step 10")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t < 25, "did not stop within the grace period"
    # torchrun forwards SIGTERM to the ranks, waits for them, then exits 1 itself (it was signalled)
    assert "stopped by SIGTERM at step" in stderr, stderr[-4000:]
    assert str(REPO / "restorer") not in stderr  # the only traceback is torchrun's own SignalException
    stopped = read_checkpoint(out / "last.pt").step
    end = metrics(out)[-1]
    assert 10 <= stopped < 40 and {k: end[k] for k in ("event", "step", "signal", "nonfinite")} == {
        "event": "stopped", "step": stopped, "signal": "SIGTERM", "nonfinite": 0}

    assert_ok(run_cmd(train_cmd(2, shards, out, *common)))
    resumed = [m for m in metrics(out) if m.get("event") == "resume"]
    assert resumed and resumed[0]["step"] == stopped
    steps = [m["step"] for m in train_lines(out)]
    assert len(steps) == len(set(steps)) and steps[-1] == 40  # no step done twice
    assert train_lines(out)[-1]["lr"] == pytest.approx(train_lines(reference)[-1]["lr"])
    assert read_checkpoint(out / "last.pt").step == 40


@pytest.mark.slow
def test_a_killed_rank_is_restarted_by_torchrun_and_resumes(tmp_path, shards):
    out = tmp_path / "run"
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # stop_grace_s: the surviving rank is stuck in a collective with the dead one; torchrun SIGTERMs it
    proc = subprocess.Popen(train_cmd(2, shards, out, "train.max_steps=30", "checkpoint.every=4", "log.val_every=0",
                                 "train.stop_grace_s=5",
                                 torchrun_args=("--max_restarts", "1")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: (out / "last.pt").exists() and _logged_step(out) >= 8, proc, "a checkpoint")
    workers = [pid for pid in _children(proc.pid) if b"launch/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-4000:]
    events = [m.get("event") for m in metrics(out) if "event" in m]
    assert events[:2] == ["start", "resume"] and events[-1] == "finished"
    assert read_checkpoint(out / "last.pt").step == 30


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"

    def writer(n: int, v: int) -> list[str]:  # a real save of a checkpoint of n weights, all v, at step v
        return [sys.executable, "-c", f"import torch, sys; sys.path.insert(0, {str(REPO)!r}); "
                "from restorer.checkpoint import Checkpoint, save_checkpoint; from restorer.models import NetworkSpec; "
                f"save_checkpoint({str(path)!r}, Checkpoint(NetworkSpec('seed'), {{'w': torch.full([{n}], {v}.0)}}, "
                f"step={v}))"]

    subprocess.run(writer(3, 1), check=True)
    proc = subprocess.Popen(writer(150_000_000, 2))
    _wait_for(lambda: any(p.name.startswith(".last.pt.tmp") and p.stat().st_size > 1_000_000
                          for p in tmp_path.iterdir()), proc, "the temporary file")
    proc.kill()
    proc.wait()
    checkpoint = read_checkpoint(path)
    assert checkpoint.step == 1 and torch.equal(checkpoint.weights["w"], torch.ones(3))


# ----------------------------------------------------------------------------- every network, end to end

NETWORKS = {"dncnn": ["model.dncnn.depth=4", "model.dncnn.channels=8"],
            "unet": ["model.unet.widths=[4,8,8,16]"],
            "nafnet": ["model.nafnet.width=4", "model.nafnet.enc_blocks=[1,1]", "model.nafnet.dec_blocks=[1,1]"]}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_each_network_trains_resumes_restores_and_evaluates(tmp_path, shards, name):
    out = tmp_path / "run"
    common = (f"model.name={name}", *NETWORKS[name], "log.val_every=2")
    p = run_cmd(train_cmd(0, shards, out, "train.max_steps=2", *common))
    assert_ok(p)
    assert f"train: network {name} (" in p.stderr and "parameters" in p.stderr and "MACs per pixel" in p.stderr
    assert_ok(run_cmd(train_cmd(0, shards, out, "train.max_steps=4", *common)))  # resumes
    assert [m["step"] for m in metrics(out) if m.get("event") == "resume"] == [2]
    assert read_checkpoint(out / "last.pt").step == 4 and read_checkpoint(out / "last.pt").network.name == name
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((shards.parent / "src" / "p00.jpg").read_bytes())
    restored = tmp_path / "restored"
    for cmd in (["restorer.restore", "--ckpt", str(out / "last.pt"), str(photo), "--out", str(restored)],
                ["restorer.evaluate", "--ckpt", str(out / "best.pt"), "--images", str(shards.parent / "src"),
                 "--quality", "10", "--json", str(tmp_path / "eval.json")]):
        assert_ok(run_cmd([sys.executable, "-m", *cmd]))
    assert (restored / "photo.png").exists()
    assert "10" in json.loads((tmp_path / "eval.json").read_text())["qualities"]
