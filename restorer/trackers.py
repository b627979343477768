"""Experiment trackers beside metrics.jsonl and TensorBoard, rank 0 only, both optional extras:

* Weights & Biases, `log.wandb=true` (`pip install -e '.[wandb]'`): offline unless
  `log.wandb_mode=online` (or WANDB_MODE says otherwise): the run's files go to RUN/wandb, and
  `wandb sync RUN/wandb/offline-run-*` uploads them later from a machine with network.
* MLflow, `log.mlflow=URI` (`pip install -e '.[mlflow]'`): a folder, `sqlite:///runs/mlflow.db`, or a
  tracking server `http://host:5000`.

Each gets the same scalars as metrics.jsonl (by step), the resolved config (parameters), the
network's size, the validation pictures, and (MLflow) the best checkpoint's card as an artifact. A
resumed run, or a requeued SLURM job, continues the same tracker run: its id is kept in
RUN/trackers.json. A tracker that fails mid-run (no disk, a server gone) says so in one warning and
is dropped: a tracker never stops a run. A tracker asked for but not installed is one line, exit 2,
before any work (restorer.checks).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from restorer.config import flatten
from restorer.errors import one_line
from restorer.fileio import atomic_write_json

IDS = "trackers.json"  # RUN/trackers.json: {"wandb": run id, "mlflow": run id}
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}


def wanted(log) -> list[str]:
    """The trackers a config's `log` section asks for."""
    return [name for name, on in (("wandb", log.wandb), ("mlflow", bool(log.mlflow))) if on]


def tracker_problem(log) -> Optional[str]:
    """Why an asked-for tracker cannot run here (its package is not installed), or None."""
    import importlib.util

    for name in wanted(log):
        if importlib.util.find_spec(name) is None:
            return f"log.{name}: needs the {name} package: pip install -e '.[{EXTRAS[name]}]'"
    return None


class Tracker:
    """One tracker behind a guard: the first exception of any call is one warning, and the tracker is
    dropped for the rest of the run."""

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
            print(f"train: warning: {self.name} failed ({what}: {type(e).__name__}: {one_line(e, 200)}); "
                  "no more logging to it, training goes on", file=sys.stderr, flush=True)

    def log(self, record: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        if scalars:
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
                              config={**config, "network": network}, settings=wandb.Settings(silent=True))
        self.id = self.run.id

    def _log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def _picture(self, path: Path, step: int) -> None:
        self.run.log({"val/picture": self.wandb.Image(str(path))}, step=step)

    def _close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, log, out_dir: Path, config: dict, network: dict, run_id: Optional[str]):
        super().__init__()
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines on the trainer's console
        self.client = mlflow.tracking.MlflowClient(tracking_uri=log.mlflow)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(log.mlflow_experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                log.mlflow_experiment, artifact_location=_artifact_location(log.mlflow))
            run = self.client.create_run(experiment_id, run_name=out_dir.name)
            run_id = run.info.run_id
            flat = flatten({**config, "network": network})
            params = [mlflow.entities.Param(k, str(v)[:500]) for k, v in flat.items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id
        self.mlflow = mlflow

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


def _artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: beside a sqlite database (MLflow's default is
    ./mlruns in whatever folder the run starts from), else where the store decides."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def open_trackers(log, out_dir: Path, config: dict, network: dict) -> list[Tracker]:
    """The trackers `log` asks for, continuing the runs RUN/trackers.json names (a resumed run);
    their ids are written back there. A tracker that cannot start is one warning, not a stopped run."""
    path = out_dir / IDS
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ids = {}
    trackers: list[Tracker] = []
    for name, cls in (("wandb", WandbTracker), ("mlflow", MlflowTracker)):
        if name not in wanted(log):
            continue
        try:
            tracker = cls(log, out_dir, config, network, ids.get(name))
        except Exception as e:  # noqa: BLE001 - a server down, a store unwritable: the run goes on
            print(f"train: warning: {name} could not start ({type(e).__name__}: {one_line(e, 200)}); training goes on without it",
                  file=sys.stderr, flush=True)
            continue
        ids[name] = tracker.id
        trackers.append(tracker)
    if trackers:
        atomic_write_json(path, ids)
    return trackers
