"""Experiment trackers beside metrics.jsonl and TensorBoard, rank 0 only, both optional extras:

* Weights & Biases, `log.wandb=true` (`pip install -e '.[wandb]'`): offline unless
  `log.wandb_mode=online` (or WANDB_MODE says otherwise): the run's files go to RUN/wandb, and
  `wandb sync RUN/wandb/offline-run-*` uploads them later from a machine with network.
* MLflow, `log.mlflow=URI` (`pip install -e '.[mlflow]'`): a folder, `sqlite:///runs/mlflow.db`, or a
  tracking server `http://host:5000`. A folder (or a file: URI) is MLflow's own folder store, the
  ./mlruns layout: MLflow 3 refuses that store unless MLFLOW_ALLOW_FILE_STORE=true, so the trainer
  sets it for itself when log.mlflow is a folder (to browse the folder, `MLFLOW_ALLOW_FILE_STORE=true
  mlflow ui --backend-store-uri FOLDER`; `mlflow migrate-filestore` moves it into a database).

Each gets the same scalars as metrics.jsonl (by step), the resolved config (parameters, with the
passwords of URLs masked), the network's size, the validation pictures, and (MLflow) the best
checkpoint's card as an artifact. A resumed run, or a requeued SLURM job, continues the same
tracker run: its id is kept in RUN/trackers.json; a run the store no longer has (the store deleted
or replaced) is one warning, and a new run takes its place there.

No tracker can stall training: each runs on its own thread, which opens it (a server's first calls
included) and sends it what the run queues. The training loop only queues; when a tracker falls
behind by PENDING records (a slow or silent server), newer records are dropped: one warning when it
starts, and the count at the end. At the end the run waits for each tracker to catch up, CLOSE_WAIT_S
at most, never more than a quarter of train.collective_timeout_s (the other ranks wait for rank 0 in
a collective meanwhile) nor half of train.stop_grace_s (after a stop signal the run must be gone
within it), then leaves without it: one warning. A tracker that fails (no disk, a server gone)
says so in one warning and is dropped; the libraries' own logging and warnings on a tracker's thread
are silenced: a tracker never stops a run, nor buries its console. A tracker asked for but not
installed is one line, exit 2, before any work (restorer.train.checks).
"""

from __future__ import annotations

import collections
import functools
import json
import re
import logging
import os
import secrets
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Callable, Optional

from restorer.base.cli import warn
from restorer.formats.run_folder import TENSORBOARD, TRACKER_IDS  # RUN/trackers.json: {"wandb": run id, ...}
from restorer.formats.config import flatten
from restorer.base.errors import one_line
from restorer.base.fileio import atomic_write_json
from restorer.base.urls import mask_secrets

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}
PENDING = 1000  # records queued for one tracker at most; newer ones are dropped
CLOSE_WAIT_S = 30.0  # how long the end of a run waits for a tracker to catch up, at most
CAUSE_CHARS = 300  # of a library's message in a warning: its start and its end (where a remedy usually is)
THREAD = "restorer-tracker-"  # the trackers' threads' names: what they log is silenced


def wanted(log) -> list[str]:
    """The trackers a config's `log` section asks for (TensorBoard only where it is installed: it is
    on by default, an optional extra)."""
    import importlib.util

    tensorboard = log.tensorboard and importlib.util.find_spec("tensorboard") is not None
    return [name for name, on in (("tensorboard", tensorboard), ("wandb", log.wandb), ("mlflow", bool(log.mlflow)))
            if on]


def tracker_problem(log) -> Optional[str]:
    """Why an asked-for tracker cannot run here (its package is not installed), or None."""
    import importlib.util

    for name in wanted(log):
        if importlib.util.find_spec(name) is None:
            return f"log.{name}: needs the {name} package: pip install -e '.[{EXTRAS[name]}]'"
    return None


def cause(e: BaseException) -> str:
    """An exception for the end of a one-line warning: its type and message, cut in the middle when
    long, so that both what went wrong and the library's advice (at the end) remain."""
    text = f"{type(e).__name__}: {one_line(e, 100_000)}"
    if len(text) <= CAUSE_CHARS:
        return text
    tail = CAUSE_CHARS * 2 // 3
    return f"{text[:CAUSE_CHARS - tail - 5]} ... {text[-tail:]}"


class _QuietOnTrackerThreads(logging.Filter):
    """Drops the records a library logs on a tracker's thread (MLflow logs tracebacks of its own on
    the root logger): the tracker's one warning says what failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(THREAD)


_QUIET = _QuietOnTrackerThreads()


def _silence(library: str) -> None:
    """The library's own logger, the root logger's records from the trackers' threads, urllib3's retry
    lines (MLflow's HTTP client) and the library's Python warnings: none reach the console."""
    logging.getLogger(library).setLevel(logging.CRITICAL + 1)
    for logger in (logging.getLogger(), logging.getLogger("urllib3.connectionpool")):
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    warnings.filterwarnings("ignore", module=rf"({library}|{re.escape(__name__)})(\.|$)")  # (ours: this module)


class Tracker:
    """One tracker behind a guard: the first exception of any call is one warning, and the tracker is
    dropped for the rest of the run. Its calls run on its Background's thread."""

    name = ""

    def __init__(self):
        self.alive = True

    def _guard(self, what: str, call) -> None:
        if not self.alive:
            return
        try:
            call()
        except Exception as e:  # noqa: BLE001 - whatever the library raises, the run goes on
            self.alive = False
            warn(f"{self.name} failed ({what}), no more logging to it; training goes on: {cause(e)}")

    def log(self, scalars: dict, step: int) -> None:
        self._guard("log", lambda: self._log(scalars, step))

    def picture(self, path: Path, step: int) -> None:
        self._guard("picture", lambda: self._picture(path, step))

    def artifact(self, path: Path) -> None:
        self._guard("artifact", lambda: self._artifact(path))

    def close(self) -> None:
        self._guard("close", self._close)

    def _log(self, scalars: dict, step: int) -> None:
        raise NotImplementedError

    def _picture(self, path: Path, step: int) -> None:
        pass

    def _artifact(self, path: Path) -> None:
        pass

    def _close(self) -> None:
        pass


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, log, out_dir: Path, config: dict, network: dict, run_id: Optional[str]):
        super().__init__()
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or log.wandb_mode
        self.run = wandb.init(project=log.wandb_project, entity=log.wandb_entity or None,
                              name=log.wandb_name or out_dir.name, tags=list(log.wandb_tags) or None,
                              dir=str(out_dir), id=run_id or secrets.token_hex(4), resume="allow", mode=mode,
                              config=mask_secrets({**config, "network": network}), settings=wandb.Settings(silent=True))
        self.id = self.run.id

    def _log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def _picture(self, path: Path, step: int) -> None:
        self.run.log({"val/picture": self.wandb.Image(str(path))}, step=step)

    def _close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    """log.tensorboard: scalars and pictures into RUN/tb, when the tensorboard package is installed."""

    name = "tensorboard"

    def __init__(self, log, out_dir: Path, config: dict, network: dict, run_id: Optional[str]):
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.id = None  # nothing to continue: a resumed run appends to the same folder
        self.writer = SummaryWriter(str(out_dir / TENSORBOARD))

    def _log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def _picture(self, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:
            self.writer.add_image("val/picture", np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def _close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, log, out_dir: Path, config: dict, network: dict, run_id: Optional[str]):
        super().__init__()
        import mlflow
        from mlflow.exceptions import MlflowException

        _silence("mlflow")
        self.mlflow = mlflow
        self.client = mlflow.tracking.MlflowClient(tracking_uri=log.mlflow)
        if run_id is not None:
            try:
                found = self.client.get_run(run_id).info.lifecycle_stage != "deleted"
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                found = False
            if found:
                self.client.update_run(run_id, status="RUNNING")
            else:
                warn(f"mlflow: {log.mlflow} has no run {run_id} ({out_dir / TRACKER_IDS} names it: the store was deleted "
                     "or replaced?); a new run takes its place")
                run_id = None
        if run_id is None:
            run_id = self._new_run(log, out_dir, mask_secrets(flatten({**config, "network": network})))
        self.id = run_id

    def _new_run(self, log, out_dir: Path, params: dict) -> str:
        experiment = self.client.get_experiment_by_name(log.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            log.mlflow_experiment, artifact_location=_artifact_location(log.mlflow))
        run_id = self.client.create_run(experiment_id, run_name=out_dir.name).info.run_id
        batch = [self.mlflow.entities.Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(run_id, params=batch[i:i + 100])
        return run_id

    def _log(self, scalars: dict, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.mlflow.entities.Metric(k, v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.id, metrics=metrics)

    def _picture(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.id, str(path), artifact_path="val")

    def _artifact(self, path: Path) -> None:
        self.client.log_artifact(self.id, str(path))

    def _close(self) -> None:
        self.client.set_terminated(self.id)


def is_folder_store(uri: str) -> bool:
    """log.mlflow names a folder (or a file: URI), MLflow's folder store, not a database or a server."""
    return urllib.parse.urlparse(uri).scheme in ("", "file")


def _artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: beside a sqlite database (MLflow's default is
    ./mlruns in whatever folder the run starts from), else where the store decides."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


class Background:
    """One tracker on its own daemon thread: the thread opens it, then makes the calls queued here in
    their order. Queuing never waits; `close` waits a bounded time. Every method is called from the
    training loop's thread."""

    def __init__(self, name: str, open_tracker: Callable[[], Tracker], opened: Callable[[Tracker], None],
                 wait_s: float):
        self.name, self.wait_s = name, wait_s
        self.pending: collections.deque = collections.deque()
        self.changed = threading.Condition()
        self.closing = self.done = False
        self.dropped = 0
        self.tracker: Optional[Tracker] = None
        self.thread = threading.Thread(target=self._run, args=(open_tracker, opened), name=THREAD + name, daemon=True)
        self.thread.start()

    def _run(self, open_tracker: Callable[[], Tracker], opened: Callable[[Tracker], None]) -> None:
        try:
            self.tracker = tracker = open_tracker()
            opened(tracker)
        except Exception as e:  # noqa: BLE001 - a server down, a store unwritable: the run goes on
            self._stop()
            warn(f"{self.name} could not start, training goes on without it; check log.{self.name}: {cause(e)}")
            return
        while tracker.alive:
            with self.changed:
                self.changed.wait_for(lambda: self.pending or self.closing)
                if not self.pending:
                    break
                call = self.pending.popleft()
            call(tracker)
        tracker.close()
        self._stop()

    def _stop(self) -> None:
        with self.changed:
            self.done = True
            self.pending.clear()

    def _queue(self, call: Callable[[Tracker], None]) -> None:
        with self.changed:
            if self.done or self.closing:
                return
            if len(self.pending) >= PENDING:
                self.dropped += 1
                if self.dropped == 1:
                    warn(f"{self.name} is too slow (a server not answering?): it is {PENDING} records behind, newer "
                         "ones are dropped (a count at the end); training goes on")
                return
            self.pending.append(call)
            self.changed.notify()

    def log(self, record: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        if scalars:
            self._queue(lambda t: t.log(scalars, step))

    def picture(self, path: Path, step: int) -> None:
        # the picture may be gone by the time a lagging tracker gets to it (only the last log.pictures are kept)
        self._queue(lambda t: t.picture(path, step) if path.is_file() else None)

    def artifact(self, path: Path) -> None:
        self._queue(lambda t: t.artifact(path))

    def begin_close(self) -> None:
        """No more records: the thread sends what is queued, closes the tracker and ends."""
        with self.changed:
            self.closing = True
            self.changed.notify()

    def close(self, deadline: Optional[float] = None) -> None:
        """Wait for the thread to end (until `deadline`, a time.monotonic(); else wait_s from now), then
        give up on it: its thread is a daemon, and the run leaves without it."""
        self.begin_close()
        self.thread.join(max(0.0, (deadline if deadline is not None else time.monotonic() + self.wait_s)
                             - time.monotonic()))
        with self.changed:
            left = len(self.pending)
        if self.thread.is_alive():
            state = "to start" if self.tracker is None else f"to send {left} records"
            warn(f"{self.name}: gave up waiting for it after {self.wait_s:g} s {state}: the tracker was too slow "
                 f"(a server not answering?){f'; {self.dropped} records dropped before' if self.dropped else ''}")
        elif self.dropped:
            warn(f"{self.name}: {self.dropped} records dropped: the tracker was too slow")


def close_trackers(trackers: list[Background]) -> None:
    """The end of a run: every tracker catches up at once, each within its wait."""
    for tracker in trackers:
        tracker.begin_close()
    deadline = time.monotonic() + max((t.wait_s for t in trackers), default=0.0)
    for tracker in trackers:
        tracker.close(deadline)


def open_trackers(log, out_dir: Path, config: dict, network: dict) -> list[Background]:
    """The trackers `log` asks for, each opened on its own thread, continuing the runs RUN/trackers.json
    names (a resumed run); their ids are written back there once open. Returns at once: a tracker that
    cannot start is one warning, not a stopped run, nor a waiting one."""
    path = out_dir / TRACKER_IDS
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ids = {}
    if not isinstance(ids, dict):
        ids = {}
    if log.mlflow and is_folder_store(log.mlflow):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for: a folder is MLflow's folder store
    train = config.get("train", {})
    wait_s = min(CLOSE_WAIT_S, train.get("collective_timeout_s", 600) / 4, train.get("stop_grace_s", 25) / 2)
    lock = threading.Lock()

    def opened(name: str, tracker: Tracker) -> None:
        if tracker.id is None:
            return
        with lock:
            ids[name] = tracker.id
            try:
                atomic_write_json(path, ids)
            except OSError as e:
                warn(f"cannot write {path} ({cause(e)}): a resumed run will start a new {name} run")

    started = []
    for name, cls in (("tensorboard", TensorBoardTracker), ("wandb", WandbTracker), ("mlflow", MlflowTracker)):
        if name in wanted(log):
            started.append(Background(name, functools.partial(cls, log, out_dir, config, network, ids.get(name)),
                                      functools.partial(opened, name), wait_s))
    return started
