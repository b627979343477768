"""Experiment trackers and validation pictures, with the real libraries: wandb offline, MLflow on a
real sqlite store and a folder store, TensorBoard's event files; a resumed run continues the same
tracker runs (a new one when the store lost it); a tracker that fails mid-run costs one warning line,
one that never answers stalls no rank, and no password of a URL reaches one; a tracker that is not
installed is one line, exit 2."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO, assert_ok, metrics, require, run_cmd, train_cmd, train_env, train_here, train_lines, wait_for

wandb = require("wandb", "wandb")
mlflow = require("mlflow", "mlflow")
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
    from restorer.infer.pictures import compare_size

    assert Image.open(pictures[-1]).size == compare_size(64, 64, with_reference=True)  # the 64 px validation crop


def test_a_tracker_that_fails_mid_run_is_one_warning_line_and_the_run_finishes(shards, tmp_path):
    out, store = tmp_path / "run", tmp_path / "mlruns"
    for broken in ("111", "222"):  # two experiments of the store without their meta.yaml: MLflow logs a traceback each
        (store / broken).mkdir(parents=True)
    # the trainer holds after step 6 until the test has taken the store away: 34 steps are then logged to it
    go = tmp_path / "store-gone"
    proc = subprocess.Popen(train_cmd(0, shards, out, "train.max_steps=40", "log.val_every=0", f"log.mlflow={store}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=train_env({"rank": 0, "hold_after_step": 6, "until_file": str(go)}))
    wait_for(lambda: (out / "trackers.json").exists() and bool(train_lines(out)), proc, "its trackers and first log")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    next(store.glob(f"*/{run_id}")).rename(tmp_path / "gone")  # the run's records gone under it (a store cleaned up)
    go.touch()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert metrics(out)[-1]["event"] == "finished" and metrics(out)[-1]["step"] == 40
    # the one line of ours, and nothing of MLflow's own (its logging, its tracebacks, its warnings)
    assert "Traceback" not in err and all(line.startswith("restorer train: ") for line in err.splitlines()), err[-3000:]
    warnings = [line for line in err.splitlines() if "mlflow" in line]
    assert len(warnings) == 1 and "mlflow failed" in warnings[0] and "training goes on" in warnings[0], err[-3000:]


@contextlib.contextmanager
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers (a tracking server
    hung), as http://127.0.0.1:PORT; it stops when the block ends."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # shut down: the block ended
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)
        for connection in held:
            connection.close()


def test_a_tracking_server_that_never_answers_stalls_no_rank_of_a_two_rank_run(shards, tmp_path):
    out = tmp_path / "run"
    # a collective timeout of 30 s: a rank 0 held up by MLflow's calls (minutes of timeouts and retries) fails the run
    with silent_server() as uri:
        p = run_cmd(train_cmd(2, shards, out, "train.max_steps=12", "log.val_every=6", "train.collective_timeout_s=30",
                              f"log.mlflow={uri}"), timeout=200)
    assert_ok(p)
    assert metrics(out)[-1]["event"] == "finished" and metrics(out)[-1]["step"] == 12
    assert [m["step"] for m in train_lines(out)] == [2, 4, 6, 8, 10, 12]
    warnings = [line for line in p.stderr.splitlines() if "mlflow" in line]
    assert len(warnings) == 1 and "gave up waiting for it after 7.5 s to start" in warnings[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_a_folder_store_records_the_run_and_a_deleted_store_resumes_tracked(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # as a user has it (restored after the test)
    out, store = tmp_path / "run", tmp_path / "mlruns"
    common = ("log.val_every=2", f"log.mlflow={store}")
    p = train_here(shards, out, "train.max_steps=4", *common)
    assert_ok(p)
    assert "mlflow" not in p.stderr
    first = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=str(store))
    assert sorted(m.step for m in client.get_metric_history(first, "loss")) == [2, 4]
    assert sorted(m.step for m in client.get_metric_history(first, "val_psnr")) == [2, 4]

    shutil.rmtree(store)  # the store deleted: trackers.json names a run it no longer has
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # (the run above set it for this process)
    p = run_cmd(train_cmd(0, shards, out, "train.max_steps=8", *common))  # a new process resumes at step 4
    assert_ok(p)
    warnings = [line for line in p.stderr.splitlines() if "mlflow" in line]
    assert len(warnings) == 1 and first in warnings[0] and "a new run takes its place" in warnings[0], p.stderr
    second = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert second != first
    assert sorted(m.step for m in client.get_metric_history(second, "loss")) == [6, 8]  # tracked again
    assert client.get_run(second).data.params["log.mlflow"] == str(store)


def test_a_tracker_that_cannot_start_is_one_line_that_keeps_the_remedy(tmp_path, monkeypatch, capsys):
    from restorer.base.cli import run
    from restorer.formats.config import load_config
    from restorer.train.trackers import close_trackers, open_trackers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # the user's own choice: a folder store is refused
    cfg = load_config(str(REPO / "configs" / "cpu.yaml"), [f"log.mlflow={tmp_path / 'mlruns'}"])

    def trainer() -> int:  # (a warning carries the name of the tool that is running)
        close_trackers(open_trackers(cfg.log, tmp_path, cfg.to_dict(), {}))
        return 0

    assert run("restorer train", trainer) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("restorer train: warning: mlflow could not start"), err
    assert "MlflowException: The filesystem tracking backend" in err  # the cause, cut in its middle
    assert "set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception." in err  # and MLflow's remedy, whole


def test_no_password_of_a_shard_url_reaches_the_trackers(tmp_path):
    from restorer.formats.config import load_config
    from restorer.train.trackers import close_trackers, open_trackers

    url = "http://user:s3cret@example.org/train-{000..009}.tar"
    cfg = load_config(str(REPO / "configs" / "cpu.yaml"), [f"data.train_urls={url}", "data.epoch_samples=100",
                                                          "log.wandb=true", f"log.mlflow={tmp_path / 'mlruns'}"])
    run = tmp_path / "run"
    run.mkdir()
    trackers = open_trackers(cfg.log, run, cfg.to_dict(), {"name": "unet", "parameters": 1})
    for tracker in trackers:
        tracker.log({"step": 1, "loss": 0.5}, 1)
    close_trackers(trackers)
    ids = json.loads((run / "trackers.json").read_text())
    params = mlflow.tracking.MlflowClient(tracking_uri=str(tmp_path / "mlruns")).get_run(ids["mlflow"]).data.params
    assert params["data.train_urls"] == "http://user:***@example.org/train-{000..009}.tar"
    assert list(run.glob(f"wandb/offline-run-*-{ids['wandb']}/run-*.wandb"))  # wandb's files are there
    assert [f for f in tmp_path.rglob("*") if f.is_file() and b"s3cret" in f.read_bytes()] == []  # in no file of either


def test_a_tracker_asked_for_but_not_installed_is_one_line_and_exit_2(shards, tmp_path):
    p = _train(shards, tmp_path / "run", "train.max_steps=2", "log.wandb=true", fault={"hide": "wandb"})
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("restorer train: error:")]
    assert errors == ["restorer train: error: log.wandb: needs the wandb package: pip install -e '.[wandb]'"], p.stderr[-3000:]
    with contextlib.suppress(FileNotFoundError):
        assert not list((tmp_path / "run").glob("*.pt"))  # before any work
