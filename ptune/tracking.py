"""Experiment tracking of a training run: ``trainer.loggers`` (csv, tensorboard, mlflow), plus ``curves.png``.

The loop calls one object, ``Tracker``: ``step`` (loss and lr of each optimizer step), ``evaluation`` (the scalar
metrics of each evaluation), ``finish`` (the results and the checkpoint) and ``close``. Whatever loggers are on,
every run folder gets ``curves.png`` (loss and eval metric against step) at the end.

- ``csv``: ``train_log.csv`` in the run folder (step, loss, lr), written at each evaluation and before each resume
  save (``flush``); a resumed run drops the rows past its resume step before appending, so the file holds each
  step once.
- ``tensorboard``: ``<run folder>/tensorboard/`` (``trainer.tensorboard=true`` is the same switch, kept).
- ``mlflow``: one MLflow run per ptune run, through ``MlflowClient`` (no global active run, so in-process search
  trials do not interfere): params (the resolved config, flattened), ``train/loss`` and ``train/lr`` per step,
  ``dev/<metric>`` per evaluation, the final results, and the checkpoint folder as an artifact. The store is
  ``trainer.mlflow_uri`` when set, else a SQLite file ``mlflow.db`` in the ``outputs/`` folder above the run
  (the run folder itself when there is none); ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``.
  The MLflow run id is kept in ``mlflow.json`` so that a resumed ptune run continues the same MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_write_json, atomic_write_text
from .errors import PtuneError, one_line
from .metrics import plot_curves, scalars
from .runfolder import MLFLOW_ARTIFACTS, MLFLOW_DB, sqlite_url

LOGGERS = ("csv", "tensorboard", "mlflow")
CSV_NAME = "train_log.csv"
MLFLOW_JSON = "mlflow.json"


def default_mlflow_db(out_dir: Path) -> Path:
    """MLflow's default store: ``mlflow.db`` in the ``outputs/`` folder above the run, else in the run folder."""
    out = Path(out_dir).resolve()
    base = next((p for p in (out, *out.parents) if p.name == "outputs"), out)
    return base / MLFLOW_DB


def sqlite_path(uri: str) -> Path | None:
    """The file of a local SQLite tracking URI (escaped or not), None for any other store."""
    if not uri.startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: MLflow will say what is wrong with it
        return None
    return Path(database) if database and database != ":memory:" else None


def _legacy_uri(uri: str) -> str:
    """How ptune before ``sqlite_url`` wrote a SQLite store's URI in mlflow.json (a resumed old run matches it)."""
    db = sqlite_path(uri)
    return f"sqlite:///{db}" if db is not None else uri


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


class Tracker:
    def __init__(self, cfg: DictConfig, out_dir: Path, loggers: list[str], mlflow_uri: str | None, metric: str):
        self.out_dir = Path(out_dir)
        self.metric = metric
        self.steps: list[tuple[int, float]] = []  # (step, loss) seen by this process
        self._csv_rows: list[list] | None = None
        self._csv = "csv" in loggers
        self._tb = None
        self._mlflow = None
        self._pending: list = []
        self._artifacts: Path | None = None
        for name, kind, needed in ((CSV_NAME, "file", self._csv), ("tensorboard", "folder", "tensorboard" in loggers)):
            path = self.out_dir / name
            if needed and path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
                raise PtuneError(
                    f"{str(path)!r} is a {'folder' if kind == 'file' else 'file'} where the run writes its {name} "
                    f"{kind}: move it away or name another hydra.run.dir"
                )
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PtuneError(
                    "trainer.loggers=[tensorboard] needs the tensorboard package: pip install tensorboard"
                ) from None
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if "mlflow" in loggers:
            db = sqlite_path(mlflow_uri) if mlflow_uri else default_mlflow_db(self.out_dir)
            uri = mlflow_uri or sqlite_url(db)
            # artifacts beside a local SQLite store (MLflow's default would be ./mlruns in the current folder)
            self._artifacts = db.parent / MLFLOW_ARTIFACTS if db is not None else None
            try:
                self._open_mlflow(cfg, uri)
            except PtuneError:
                raise
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a store it cannot use
                where = f"trainer.mlflow_uri={mlflow_uri!r}" if mlflow_uri else f"the MLflow store {str(db)!r}"
                raise PtuneError(
                    f"{where} cannot be used ({one_line(exc, 200)}): give a tracking URI such as "
                    "sqlite:///path/mlflow.db, file:///path/mlruns or http://host:5000"
                ) from None

    # ---------------------------------------------------------------------------------------------- mlflow
    def _open_mlflow(self, cfg: DictConfig, uri: str) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise PtuneError("trainer.loggers=[mlflow] needs the mlflow package: pip install mlflow") from None
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines ("Creating ... tables") on stderr
        client = MlflowClient(tracking_uri=uri)
        saved = self.out_dir / MLFLOW_JSON
        run_id = None
        if saved.is_file():  # a resumed ptune run continues its MLflow run
            try:
                info = json.loads(saved.read_text(encoding="utf-8"))
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise PtuneError(
                    f"{str(saved)!r} is not the MLflow run record ptune writes ({one_line(exc, 120)}): it should be "
                    '{"uri": ..., "run_id": ...}; delete it to start a new MLflow run'
                ) from None
            if info.get("uri") in (uri, _legacy_uri(uri)):
                run_id = info.get("run_id")
        if run_id is None:
            name = str(OmegaConf.select(cfg, "experiment_name", default="default") or "default")
            exp = client.get_experiment_by_name(name)
            where = (self._artifacts / name).as_uri() if self._artifacts else None
            exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=where)
            run = client.create_run(exp_id, run_name=self.out_dir.name, tags={"ptune.run_folder": str(self.out_dir)})
            run_id = run.info.run_id
            plain = OmegaConf.to_container(cfg, resolve=True)
            plain.pop("hydra", None)
            params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(plain).items())]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i : i + 100])
            atomic_write_json(saved, {"uri": uri, "run_id": run_id})
        else:
            client.update_run(run_id, status="RUNNING")
        self._mlflow = (client, run_id)

    def _flush_mlflow(self) -> None:
        if self._mlflow and self._pending:
            client, run_id = self._mlflow
            for i in range(0, len(self._pending), 1000):
                client.log_batch(run_id, metrics=self._pending[i : i + 1000])
            self._pending = []

    def _mlflow_metric(self, key: str, value: float, step: int) -> None:
        if self._mlflow:
            import time

            from mlflow.entities import Metric

            self._pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    # ------------------------------------------------------------------------------------------------ loop
    def step(self, step: int, loss: float, lr: float) -> None:
        self.steps.append((step, loss))
        if self._csv:
            if self._csv_rows is None:
                self._csv_rows = self._read_csv(before=step)
            self._csv_rows.append([step, loss, lr])
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)
        self._mlflow_metric("train/loss", loss, step)
        self._mlflow_metric("train/lr", lr, step)

    def evaluation(self, step: int, res: dict) -> None:
        for key, value in scalars(res).items():
            if key == "eval_examples_per_s":
                continue
            if self._tb is not None:
                self._tb.add_scalar(f"dev/{key}", value, step)
            self._mlflow_metric(f"dev/{key}", value, step)
        self._flush_mlflow()
        self._write_csv()

    def flush(self) -> None:
        """Write out every step logged so far; the loop calls it before each resume save. A killed run loses what
        was logged after its last flush and resumes from its last save, so flushing at every save (not only at
        evaluations) keeps every step the resume state holds in train_log.csv, TensorBoard and MLflow; a flush per
        step would rewrite train_log.csv whole at every step (quadratic in the run's length)."""
        self._write_csv()
        if self._tb is not None:
            self._tb.flush()
        self._flush_mlflow()

    def finish(self, results: dict, history: list[dict]) -> None:
        plot_curves(self.out_dir / "curves.png", self._all_steps(), history, self.metric)
        self._write_csv()
        if self._mlflow:
            client, run_id = self._mlflow
            final = {f"final/{k}": v for k, v in scalars(results).items()}
            final.update({f"final/{k}": v for k, v in scalars(results.get("metrics", {})).items()})
            for key, value in final.items():
                self._mlflow_metric(key, value, int(results.get("steps", 0)))
            self._flush_mlflow()
            ckpt = self.out_dir / "checkpoint"
            if ckpt.is_dir():
                client.log_artifacts(run_id, str(ckpt), "checkpoint")
            for name in ("results.json", "curves.png", "confusion.png"):
                if (self.out_dir / name).is_file():
                    client.log_artifact(run_id, str(self.out_dir / name))
            client.set_terminated(run_id, "FINISHED")
            self._mlflow = None

    def close(self, failed: bool = False) -> None:
        """End of the loop (run_training's `finally`): flush; end the MLflow run only when the loop failed."""
        self._write_csv()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow:
            self._flush_mlflow()
            if failed:  # else `finish` (after the loop) logs the results and ends the MLflow run
                client, run_id = self._mlflow
                client.set_terminated(run_id, "FAILED")
                self._mlflow = None

    # ------------------------------------------------------------------------------------------------- csv
    def _read_csv(self, before: int) -> list[list]:
        path = self.out_dir / CSV_NAME
        if not path.is_file():
            return []
        rows = []
        for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
            try:
                if int(row["step"]) < before:
                    rows.append([int(row["step"]), float(row["loss"]), float(row["lr"])])
            except (KeyError, TypeError, ValueError):
                continue
        return rows

    def _write_csv(self) -> None:
        if not self._csv or self._csv_rows is None:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "loss", "lr"])
        w.writerows(self._csv_rows)
        atomic_write_text(self.out_dir / CSV_NAME, buf.getvalue())

    def _all_steps(self) -> list[tuple[int, float]]:
        if self._csv_rows:
            return [(int(s), float(v)) for s, v, _ in self._csv_rows]
        return self.steps


class NullTracker:
    """What ranks other than 0 use: nothing is logged."""

    steps: list = []

    def step(self, *args) -> None:
        pass

    def evaluation(self, *args) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, *args) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def open_tracker(cfg: DictConfig, tr, out_dir: Path) -> Tracker:
    loggers = list(tr.loggers)
    if tr.tensorboard and "tensorboard" not in loggers:
        loggers.append("tensorboard")
    return Tracker(cfg, out_dir, loggers, tr.mlflow_uri, tr.metric)
