"""Experiment trackers and validation pictures, with the real libraries: wandb offline, MLflow on a
real sqlite store, TensorBoard's event files; a resumed run continues the same tracker runs; a
tracker that fails mid-run costs one warning; one that is not installed is one line, exit 2."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_ok, metrics, run_cmd, train_cmd, train_env, train_lines

wandb = pytest.importorskip("wandb", reason="the wandb extra")
mlflow = pytest.importorskip("mlflow", reason="the mlflow extra")
pytestmark = pytest.mark.slow


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} from a wandb offline run's .wandb file: a LevelDB-style log (7-byte
    header, then records of crc32, length, type and a protobuf Record in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    history, pos, pending = {}, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's trailer
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding: no more records
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(int(items.pop("_step")), {}).update(items)
    return history


def _train(shards, out: Path, *overrides: str, fault: dict | None = None) -> subprocess.CompletedProcess:
    return run_cmd(train_cmd(0, shards, out, "log.val_every=2", "log.tensorboard=true", *overrides), fault=fault)


def test_the_same_scalars_reach_metrics_tensorboard_wandb_and_mlflow_and_a_resume_continues_them(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    trackers = ("log.wandb=true", f"log.mlflow=sqlite:///{db}", "log.pictures=2")
    assert_ok(_train(shards, out, "train.max_steps=4", *trackers))
    ids = json.loads((out / "trackers.json").read_text())
    assert_ok(_train(shards, out, "train.max_steps=8", *trackers))  # resumes at step 4
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same tracker runs, continued
    loss = {m["step"]: m["loss"] for m in train_lines(out)}
    psnr = {m["step"]: m["val_psnr"] for m in metrics(out) if "val_psnr" in m}
    assert sorted(loss) == [2, 4, 6, 8] and sorted(psnr) == [2, 4, 6, 8]

    # MLflow (sqlite): every step once, after the resume too, and the best checkpoint's card
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    history = client.get_metric_history(ids["mlflow"], "loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]
    assert {m.step: m.value for m in history} == pytest.approx(loss)
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "val_psnr")} == pytest.approx(psnr)
    run = client.get_run(ids["mlflow"])
    assert run.data.params["optim.lr"] == "0.001" and int(run.data.params["network.parameters"]) > 0
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert "card.json" in artifacts and "val" in artifacts
    assert json.loads(Path(client.download_artifacts(ids["mlflow"], "card.json", str(tmp_path))).read_text())[
        "network"] == "unet"

    # wandb, offline: one offline run per process, both with the run's id; together every step once
    runs = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(runs) == 2
    steps = {}
    for r in runs:
        for step, items in wandb_history(r).items():
            steps.setdefault(step, {}).update(items)
    assert {s: v["loss"] for s, v in steps.items() if "loss" in v} == pytest.approx(loss)
    assert {s: v["val_psnr"] for s, v in steps.items() if "val_psnr" in v} == pytest.approx(psnr)
    pictures = {s for s, v in steps.items() if v.get("val/picture/_type") == "image-file"}
    assert pictures == {2, 4, 6, 8} and list(runs[0].glob("files/media/images/val/picture_*.png"))

    # TensorBoard: the same scalars, and the pictures
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(loss)
    assert {e.step for e in events.Images("val/picture")} == {2, 4, 6, 8}

    # the pictures: the last log.pictures kept, JPEG | network | original with a zoomed crop
    pictures = sorted((out / "val").glob("step-*.png"))
    assert [p.name for p in pictures] == ["step-00000006.png", "step-00000008.png"]
    from restorer.pictures import compare_size

    assert Image.open(pictures[-1]).size == compare_size(64, 64, with_reference=True)  # the 64 px validation crop


def test_a_tracker_that_fails_mid_run_is_one_warning_and_the_run_finishes(shards, tmp_path):
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    proc = subprocess.Popen(train_cmd(0, shards, out, "train.max_steps=60", "log.val_every=0", f"log.mlflow=sqlite:///{db}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not train_lines(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)  # polling the run's own file, not guessing a duration
    with open(db, "r+b") as f:  # the store is gone bad under the run (a disk failing, a server replaced)
        f.write(b"not a database" * 4096)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "mlflow failed" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0], err[-3000:]
    assert metrics(out)[-1]["event"] == "finished" and metrics(out)[-1]["step"] == 60


def test_a_tracker_asked_for_but_not_installed_is_one_line_and_exit_2(shards, tmp_path):
    p = _train(shards, tmp_path / "run", "train.max_steps=2", "log.wandb=true", fault={"hide": "wandb"})
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("train: error:")]
    assert errors == ["train: error: log.wandb: needs the wandb package: pip install -e '.[wandb]'"], p.stderr[-3000:]
    with contextlib.suppress(FileNotFoundError):
        assert not list((tmp_path / "run").glob("*.pt"))  # before any work
