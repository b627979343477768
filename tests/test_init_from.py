"""train.init_from: a fresh run starts from another run's weights (its checkpoint's EMA, or an exported
.safetensors file) with a fresh optimizer; a resume ignores it; a file that cannot be used, or that
holds another network, is one line before any work."""

from __future__ import annotations

import torch

from helpers import assert_ok, cli_here, load_state, metrics, train_here

# lr so small that the weights do not move in 2 steps: what the run ends with is what it started from
STILL = ("train.max_steps=2", "optim.lr=1e-30", "optim.schedule=constant", "log.val_every=0")


def _weights(path) -> dict:
    state = load_state(path)
    return state["ema"] if state.get("ema") is not None else state["model"]


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), "weights differ"


def test_a_fresh_run_starts_from_a_checkpoints_ema_weights_and_a_resume_ignores_it(base_run, shards, tmp_path):
    out = tmp_path / "fine"
    p = train_here(shards, out, *STILL, f"train.init_from={base_run / 'last.pt'}")
    assert_ok(p)
    assert f"starting from the weights of {base_run / 'last.pt'}" in p.stderr
    start = metrics(out)[0]
    assert start["event"] == "start" and start["init_from"] == str(base_run / "last.pt") and start["step"] == 0
    _assert_close(load_state(out / "last.pt")["model"], _weights(base_run / "last.pt"))
    assert load_state(out / "last.pt")["step"] == 2  # its own steps: a fresh optimizer and schedule
    # a requeue resumes the run: its own weights, not the file's again; the file is not even read (it may
    # be gone, or on a disk the new node does not see), and it is no change of the run
    p = train_here(shards, out, "train.max_steps=3", "optim.lr=1e-30", "optim.schedule=constant", "log.val_every=0",
                   f"train.init_from={tmp_path / 'moved-away.pt'}")
    assert_ok(p)
    resumed = [m for m in metrics(out) if m.get("event") == "resume"]
    assert resumed and "init_from" not in resumed[-1] and "starting from the weights" not in p.stderr
    assert resumed[-1]["changes"] == ["train.max_steps 2 -> 3"]


def test_a_run_starts_from_an_exported_safetensors_file(base_run, shards, tmp_path):
    from restorer.tools.export import main as export

    net = tmp_path / "net.safetensors"
    assert_ok(cli_here(export, "--ckpt", base_run / "last.pt", "--format", "safetensors", "--out", net))
    assert_ok(train_here(shards, tmp_path / "fine", *STILL, f"train.init_from={net}"))
    _assert_close(load_state(tmp_path / "fine" / "last.pt")["model"], _weights(base_run / "last.pt"))


def test_another_network_or_a_missing_file_is_one_line_before_any_work(base_run, shards, tmp_path):
    for overrides, said in (((f"train.init_from={base_run / 'last.pt'}", "model.name=dncnn"),
                             "but the config trains dncnn ("),
                            ((f"train.init_from={tmp_path / 'missing.pt'}",), "missing.pt")):
        out = tmp_path / "refused"
        p = train_here(shards, out, *STILL, *overrides)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("restorer train: error: train.init_from: ") and said in p.stderr, p.stderr
        assert not (out / "last.pt").exists()


def test_a_file_in_the_runs_own_folder_is_refused_before_anything_is_deleted(base_run, shards):
    """A fresh start over the run (overwrite) would delete the very file it was to start from."""
    before = (base_run / "last.pt").read_bytes()
    p = train_here(shards, base_run, *STILL, f"train.init_from={base_run / 'last.pt'}", "train.resume=false",
                   "train.overwrite=true")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "is in train.out_dir" in p.stderr and (base_run / "last.pt").read_bytes() == before
