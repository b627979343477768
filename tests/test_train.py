"""The trainer, for real: torchrun with gloo on the CPU, tiny shards, real signals and kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (REPO, assert_ok, children, cli_here, load_state, logged_step, metrics, pack_photos, run_cmd,
                     train_cmd, train_env, train_here, train_lines, wait_for)
from restorer.__main__ import main as restorer_main
from restorer.formats.checkpoint import read_checkpoint
from restorer.formats.config import load_config
from restorer.tools.evaluate import main as evaluate_main
from restorer.models import NetworkSpec
from restorer.train.optim import lr_multiplier
from restorer.tools.restore import main as restore_main
from restorer.train.loop import Training, train_step


# ----------------------------------------------------------------------------- fast: one process


@pytest.mark.slow
def test_bad_config_and_missing_shards_exit_2_with_one_line(tmp_path, shards):
    for in_process, overrides, message in (  # (the first through launch/train.py's process: its exit status)
        (False, ["train.max_step=5"], "unknown key train.max_step"),
        (True, [f"data.shards={tmp_path}/nothing"], "no shard manifest at"),
        (True, ["optim.lr=fast"], "optim.lr: expected a number"),
    ):
        p = (train_here(shards, tmp_path / "out", *overrides) if in_process
             else run_cmd(train_cmd(0, shards, tmp_path / "out", *overrides)))
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("restorer train: error: ") and p.stderr.count("\n") == 1, p.stderr
        assert message in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_process_trains_validates_and_checkpoints(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(train_here(shards, out, "train.max_steps=6", "log.val_every=3", "checkpoint.every=3"))
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
    p = train_here(shards, out, "train.max_steps=8", "model.name=dncnn")
    assert p.returncode == 1 and "use another train.out_dir, or train.resume=false" in p.stderr


def test_the_loop_switches_work_together(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(train_here(shards, out, "train.max_steps=4", "train.grad_accum=2", "train.precision=bf16",
                         "train.channels_last=true", "optim.ema=0.9", "optim.schedule=cosine", "optim.warmup_steps=2",
                         "optim.grad_clip=0.5", "optim.name=adamw", "log.val_every=2", "log.every=1",
                         "optim.loss=charbonnier"))
    state = load_state(out / "last.pt")
    assert state["step"] == 4 and "ema" in state
    lines = train_lines(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert lines[0]["lr"] == pytest.approx(1e-3 * 0.5)  # warmup: step 1 of 2
    assert lines[0]["patches_per_s"] > 0 and all(m["nonfinite"] == 0 for m in lines)


@pytest.mark.slow
def test_a_config_and_its_shards_are_checked_before_submitting(shards, tmp_path):
    """python -m restorer slurm check, on a login node: no cluster needed."""
    def check(data: Path) -> subprocess.CompletedProcess:  # (the command, in this process)
        return cli_here(restorer_main, "slurm", "check", "--config", REPO / "configs" / "cpu.yaml", f"data.shards={data}")

    ok = check(shards)
    assert ok.returncode == 0 and "restorer slurm: the config and its shards are fine" in ok.stdout, ok.stderr
    bad = check(tmp_path / "typo")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no shard manifest" in bad.stderr


# ----------------------------------------------------------------------------- each switch of the step does what it says


def _training(*overrides: str):
    """A tiny U-Net's Training, as the trainer builds it, the same initial weights every time."""
    cfg = load_config(str(REPO / "configs" / "cpu.yaml"), ["data.shards=unused", "data.patch.size=16",
                                                            "model.unet.widths=[4,8]", "optim.loss=mse", *overrides])
    torch.manual_seed(0)
    return Training.build(cfg, torch.device("cpu"))


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    noisy = (target.short() + torch.randint(-20, 21, target.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return noisy, target, torch.randint(10, 96, (n,), generator=g).float()


def _weights(t) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


def test_grad_accum_of_two_halves_is_one_step_on_the_whole_batch():
    whole = _batch(8, 1)
    halves = [tuple(x[:4] for x in whole), tuple(x[4:] for x in whole)]
    a, b = _training("train.grad_accum=2"), _training()
    train_step(a, halves)
    train_step(b, [whole])
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(_weights(a), _weights(b)))
    c = _training()
    train_step(c, [halves[0]])  # (one half alone is another step)
    assert not all(torch.allclose(p, q, atol=1e-6) for p, q in zip(_weights(c), _weights(b)))


def test_grad_clip_bounds_the_gradient_the_optimizer_sees():
    beta2 = 0.999
    free, clipped = _training(), _training("optim.grad_clip=1e-5")
    batch = _batch(4, 2)
    train_step(free, [batch])
    train_step(clipped, [batch])
    # Adam's second moment after one step is (1 - beta2) g^2: its sum says the gradient's norm
    norm_sq = lambda t: sum(t.optimizer.state[p]["exp_avg_sq"].sum().item() for p in t.model.parameters())  # noqa: E731
    assert norm_sq(clipped) / (1 - beta2) == pytest.approx(1e-10, rel=1e-3)  # the norm, clipped to 1e-5
    assert norm_sq(free) / (1 - beta2) > 100 * 1e-10


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_precision_and_channels_last_reach_the_convolutions(precision, channels_last):
    t = _training(f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}")
    seen = []
    t.model.head.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out.dtype)))
    train_step(t, [_batch(2, 3)])
    x, dtype = seen[0]
    assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) == channels_last
               for p in t.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)


def test_adamw_ema_and_the_schedule_do_what_they_say():
    t = _training("optim.name=adamw", "optim.weight_decay=0.5", "optim.ema=0.9")
    assert type(t.optimizer) is torch.optim.AdamW and t.optimizer.param_groups[0]["weight_decay"] == 0.5
    before, ema_before = _weights(t), [p.detach().clone() for p in t.ema.parameters()]
    train_step(t, [_batch(2, 4)])
    for e0, e1, p1 in zip(ema_before, t.ema.parameters(), t.model.parameters()):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * p1.detach())
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(t)))
    adam = _training("optim.name=adam", "optim.weight_decay=0.5")
    assert type(adam.optimizer) is torch.optim.Adam


def test_the_schedules_and_the_losses():
    from restorer.train.optim import loss_fn, lr_multiplier

    o = load_config(None, ["data.shards=x", "optim.schedule=step", "optim.step_every=10", "optim.step_gamma=0.5",
                           "optim.warmup_steps=4"]).optim
    assert [lr_multiplier(o, s, 0.0) for s in (0, 3, 4, 13, 14, 24)] == [0.25, 1.0, 1.0, 1.0, 0.5, 0.25]
    o = load_config(None, ["data.shards=x", "optim.schedule=cosine", "optim.min_lr_scale=0.1"]).optim
    assert [lr_multiplier(o, 0, p) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    out, y = torch.tensor([[0.5, 0.2]]), torch.tensor([[0.5, 0.6]])
    l1 = load_config(None, ["data.shards=x", "optim.loss=l1"]).optim
    assert loss_fn(l1)(out, y).item() == pytest.approx(0.2)
    psnr = load_config(None, ["data.shards=x", "optim.loss=psnr"]).optim
    assert loss_fn(psnr)(out, y).item() == pytest.approx(10 * np.log10(0.08), rel=1e-5)  # minus the PSNR


def test_the_output_layer_trains_at_last_lr_scale_for_every_network():
    from restorer.train.optim import make_optimizer

    seed = load_config(str(REPO / "configs" / "seed.yaml"), ["data.shards=x"])
    model = seed.network().build()
    groups = make_optimizer(model, seed.optim, torch.device("cpu")).param_groups
    last_ids = {id(p) for p in model.last.parameters()}
    assert {id(p) for p in groups[1]["params"]} == last_ids  # the document's `last` ...
    assert groups[1]["lr"] == pytest.approx(0.5 * groups[0]["lr"]) and groups[0]["lr"] == 5e-4  # ... at half the lr
    for name, layer in (("unet", "tail"), ("nafnet", "ending"), ("dncnn", "body")):
        cfg = load_config(None, ["data.shards=x", f"model.name={name}", "optim.last_lr_scale=0.25"])
        model = cfg.network().build()
        last = model.last_layer()
        assert last is (getattr(model, layer)[-1] if name == "dncnn" else getattr(model, layer))
        g = make_optimizer(model, cfg.optim, torch.device("cpu")).param_groups
        assert {id(p) for p in g[1]["params"]} == {id(p) for p in last.parameters()}
        assert g[1]["lr"] == pytest.approx(0.25 * g[0]["lr"])


# A child process's script: one gloo group of one rank, world_size=2 (which puts the network inside DDP),
# one channels_last step of each network; it prints what DDP warned and exits without tearing the group down.
# (In the test's own process, torch deadlocked once: freeing the DDP's gloo group joins its worker thread
# while holding the GIL, and that thread was waiting for the GIL to free a finished allreduce.)
_DDP_STEP = """
import json, os, sys, warnings
import torch
sys.path[:0] = [{tests!r}, {repo!r}]
from test_train import NETWORKS, _batch
from restorer.formats.config import load_config
from restorer.train.loop import Training, train_step
torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
said = {{}}
for name, options in NETWORKS.items():
    cfg = load_config({config!r}, ["data.shards=unused", "data.patch.size=16", f"model.name={{name}}", *options,
                                   "train.channels_last=true"])
    t = Training.build(cfg, torch.device("cpu"), world_size=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_step(t, [_batch(2, 3)])
    said[name] = {{"ddp": t.ddp is not None, "warnings": [str(w.message) for w in seen],
                  "channels_last": all(p.is_contiguous(memory_format=torch.channels_last) for m in t.model.modules()
                                       if isinstance(m, torch.nn.Conv2d) for p in m.parameters() if p.dim() == 4)}}
print(json.dumps(said), flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_a_ddp_step_in_channels_last_has_nothing_to_warn_of():
    """DDP's "Grad strides do not match bucket view strides" came once per rank: NAFNet's 1 x C x 1 x 1
    scales in channels_last had strides their gradients do not have."""
    script = _DDP_STEP.format(tests=str(REPO / "tests"), repo=str(REPO), config=str(REPO / "configs" / "cpu.yaml"))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=train_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    said = json.loads(p.stdout.splitlines()[-1])
    assert sorted(said) == sorted(NETWORKS)
    for name, step in said.items():
        assert step["ddp"] and not step["warnings"], (name, step)
        assert step["channels_last"], name  # the convolutions still run channels_last


def test_charbonnier_is_a_smooth_l1():
    from restorer.train.optim import loss_fn

    cfg = load_config(None, ["data.shards=x", "optim.loss=charbonnier", "optim.charbonnier_eps=0.1"])
    out, y = torch.tensor([[0.5, 0.2]]), torch.tensor([[0.5, 0.6]])
    assert loss_fn(cfg.optim)(out, y).item() == pytest.approx((0.1 + (0.4**2 + 0.01) ** 0.5) / 2)


@pytest.mark.slow
def test_a_time_budget_ends_the_run_and_drives_the_schedule(tmp_path, shards):
    out = tmp_path / "run"
    assert_ok(train_here(shards, out, "train.max_minutes=0.05", "train.max_steps=0", "train.epochs=100000",
                         "optim.schedule=cosine", "log.val_every=0", "log.every=1"))
    end = metrics(out)[-1]
    assert end["event"] == "finished" and end["reason"] == "max_minutes" and 0.05 <= end["minutes"] < 0.5
    assert train_lines(out)[0]["lr"] == pytest.approx(1e-3)
    spent = read_checkpoint(out / "last.pt").train_seconds
    assert spent >= 3
    # resumed runs add up: a budget the first run already spent ends the next at once, no step more
    steps = read_checkpoint(out / "last.pt").step
    assert_ok(train_here(shards, out, f"train.max_minutes={spent / 60 * 0.9:.4f}", "train.max_steps=0",
                         "train.epochs=100000", "log.val_every=0"))
    end = metrics(out)[-1]
    assert end["event"] == "finished" and end["reason"] == "max_minutes" and end["step"] == steps
    # and a larger one goes on from the time spent, not from zero: its first step's lr is the cosine's at the
    # time spent over the budget (however many steps a busy machine fitted into the first run)
    budget = f"{(spent + 2) / 60:.4f}"
    assert_ok(train_here(shards, out, f"train.max_minutes={budget}", "train.max_steps=0", "train.epochs=100000",
                         "optim.schedule=cosine", "log.val_every=0", "log.every=1"))
    assert metrics(out)[-1]["step"] > steps and spent + 2 <= read_checkpoint(out / "last.pt").train_seconds < spent + 30
    optim = load_config(str(REPO / "configs" / "cpu.yaml"), ["data.shards=x", "optim.schedule=cosine"]).optim
    first = next(m for m in train_lines(out) if m["step"] == steps + 1)
    assert first["lr"] == pytest.approx(optim.lr * lr_multiplier(optim, steps, spent / (float(budget) * 60)))
    assert first["lr"] < 0.9 * optim.lr  # (the time spent drives it: by steps it would still be about optim.lr)


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_clear_error(tmp_path, shards):
    p = train_here(shards, tmp_path / "run", "train.max_steps=50", "optim.lr=1e12", "optim.loss=mse_sum",
                   "train.max_nonfinite=3", "log.val_every=0")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "non-finite steps in a row" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_ranks_learn_and_only_rank0_writes(tmp_path, shards):
    out = tmp_path / "run"
    # JPEG q10 alone: artifacts a few steps of a tiny network learn to take off. 2 workers a rank: the 3
    # shards are fewer than the 4 streams, and 30 steps go past an epoch's end (uneven shards never hang; one
    # shard: test_sigterm_saves_now_and_a_restart_resumes_to_the_same_end)
    assert_ok(run_cmd(train_cmd(2, shards, out, "train.max_steps=30", "log.val_every=0", "checkpoint.every=10",
                  "checkpoint.keep=2", "data.jpeg.quality=[10,10]", "data.jpeg.quality_weights=[]",
                  "data.jpeg.double_p=0", "optim.loss=mse", "data.workers=2")))  # (mse: a loss whose ratio to the JPEG's means "better")
    lines = train_lines(out)
    assert [m["step"] for m in lines] == list(range(2, 31, 2))  # one writer: no step logged twice
    # the network's loss relative to the JPEG input's: 1 at the start (the identity), falling as it
    # learns (the loss itself rises and falls with the qualities of each batch)
    ratio = [m["loss"] / m["target"] for m in lines]
    first, last = sum(ratio[:3]) / 3, sum(ratio[-3:]) / 3
    assert last < min(1.0, first - 0.02), ratio  # below the JPEG's own loss by the end
    events = [m["event"] for m in metrics(out) if "event" in m]
    assert events == ["start", "finished"]
    start = metrics(out)[0]
    assert start["world_size"] == 2 and start["total_steps"] == 30 and start["steps_per_epoch"] == 16
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt", "step-00000020.pt", "step-00000030.pt"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert read_checkpoint(out / "last.pt").step == 30


@pytest.mark.slow
def test_two_torchrun_agents_make_one_run_across_machines(tmp_path, shards):
    """torchrun on each machine, no SLURM: --nnodes=2 and the same c10d endpoint (here both on this one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    launch = train_cmd(0, shards, out, "train.max_steps=4", "log.val_every=0")[1:]  # launch/train.py, its arguments
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-machines", *launch]
    agents = [subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
              for _ in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-3000:]
    start, end = metrics(out)[0], metrics(out)[-1]
    assert start["world_size"] == 2 and end["event"] == "finished" and end["step"] == 4
    assert [m["step"] for m in train_lines(out)] == [2, 4]  # one writer


@pytest.mark.slow
def test_sigusr1_to_the_trainer_itself_saves_and_exits_0(tmp_path, shards):
    """What SLURM's --signal=USR1 sends a task started by srun without torchrun."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(0, shards, out, "train.max_steps=400", "log.val_every=0", "checkpoint.every=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    wait_for(lambda: logged_step(out) >= 4, proc, "step 4")
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = read_checkpoint(out / "last.pt").step
    assert 4 <= stopped < 400 and f"stopped by SIGUSR1 at step {stopped}" in stderr
    assert metrics(out)[-1] | {"minutes": 0} == {"event": "stopped", "step": stopped, "signal": "SIGUSR1",
                                                 "nonfinite": 0, "minutes": 0}


@pytest.mark.slow
def test_sigterm_saves_now_and_a_restart_resumes_to_the_same_end(tmp_path):
    """On one shard for 2 ranks x 2 workers (uneven shards never hang; 3 shards for 4 streams:
    test_two_ranks_learn_and_only_rank0_writes), 40 steps: an epoch is 8 images x 8 patches / (2 a batch x
    2 ranks) = 16 steps: the resumed run goes past the ends of two."""
    shards = pack_photos(tmp_path, 10, maxcount=8)
    common = ("train.max_steps=40", "log.val_every=0", "checkpoint.every=1000", "optim.schedule=cosine",
              "optim.warmup_steps=4", "data.workers=2")
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(2, shards, out, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=train_env())
    wait_for(lambda: logged_step(out) >= 10, proc, "step 10")
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
    # the schedule went on from the step it stopped at: each logged step's lr is the one the step before it set
    optim = load_config(str(REPO / "configs" / "cpu.yaml"), [f"data.shards={shards}", *common]).optim
    assert [m["lr"] for m in train_lines(out)] == pytest.approx(
        [optim.lr * lr_multiplier(optim, m["step"] - 1, (m["step"] - 1) / 40) for m in train_lines(out)])
    assert read_checkpoint(out / "last.pt").step == 40 and metrics(out)[0]["steps_per_epoch"] == 16


@pytest.mark.slow
def test_a_killed_rank_is_restarted_by_torchrun_and_resumes(tmp_path, shards):
    out = tmp_path / "run"
    # stop_grace_s: the surviving rank is stuck in a collective with the dead one; torchrun SIGTERMs it
    proc = subprocess.Popen(train_cmd(2, shards, out, "train.max_steps=30", "checkpoint.every=4", "log.val_every=0",
                                      "train.stop_grace_s=5", torchrun_args=("--max_restarts", "1")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    wait_for(lambda: (out / "last.pt").exists() and logged_step(out) >= 8, proc, "a checkpoint")
    workers = [pid for pid in children(proc.pid) if b"launch/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
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
                "from restorer.formats.checkpoint import Checkpoint, save_checkpoint; from restorer.models import NetworkSpec; "
                f"save_checkpoint({str(path)!r}, Checkpoint(NetworkSpec('seed'), {{'w': torch.full([{n}], {v}.0)}}, "
                f"step={v}))"]

    subprocess.run(writer(3, 1), check=True)
    proc = subprocess.Popen(writer(150_000_000, 2))
    wait_for(lambda: any(p.name.startswith(".last.pt.tmp") and p.stat().st_size > 1_000_000
                         for p in tmp_path.iterdir()), proc, "the temporary file")
    proc.kill()
    proc.wait()
    checkpoint = read_checkpoint(path)
    assert checkpoint.step == 1 and torch.equal(checkpoint.weights["w"], torch.ones(3))


# ----------------------------------------------------------------------------- every network, end to end

NETWORKS = {"dncnn": ["model.dncnn.depth=4", "model.dncnn.channels=8"],
            "unet": ["model.unet.widths=[4,8,8,16]"],
            "nafnet": ["model.nafnet.width=4", "model.nafnet.enc_blocks=[1,1]", "model.nafnet.dec_blocks=[1,1]"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_each_network_trains_resumes_restores_and_evaluates(tmp_path, shards, name):
    out = tmp_path / "run"
    common = (f"model.name={name}", *NETWORKS[name], "log.val_every=2")
    p = train_here(shards, out, "train.max_steps=2", *common)
    assert_ok(p)
    assert f"restorer train: network {name} (" in p.stderr and "parameters" in p.stderr and "MACs per pixel" in p.stderr
    assert_ok(train_here(shards, out, "train.max_steps=4", *common))  # resumes
    assert [m["step"] for m in metrics(out) if m.get("event") == "resume"] == [2]
    assert read_checkpoint(out / "last.pt").step == 4 and read_checkpoint(out / "last.pt").network.name == name
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((shards.parent / "src" / "p00.jpg").read_bytes())
    restored = tmp_path / "restored"
    # (in this process: the command lines' own processes are tested in test_restore and test_evaluate)
    assert restore_main(["--ckpt", str(out / "last.pt"), str(photo), "--out", str(restored)]) == 0
    assert evaluate_main(["--ckpt", str(out / "best.pt"), "--images", str(shards.parent / "src"), "--quality", "10",
                          "--json", str(tmp_path / "eval.json")]) == 0
    assert (restored / "photo.png").exists()
    assert "10" in json.loads((tmp_path / "eval.json").read_text())["qualities"]
