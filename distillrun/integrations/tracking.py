"""Experiment trackers (`logger=mlflow`, `logger=tensorboard`) and the search's pruning, as
observers of a run.

`Run.log` hands every metrics.jsonl record to `epoch`, and `Run.write_manifest` every manifest
to `manifest_written`: the first one (status running) starts the run's observers, a final one
(complete, failed, interrupted, pruned) ends them. A tracker is imported only when selected, and
one that fails prints one warning line and is dropped: the run goes on and its folder stays
complete. `TrackingCallback` (conf/base.yaml) makes a sweep's MLflow parent run.

Nothing here imports torch or a tracker at module level: config checks and the sweep's callback
use this module.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillrun.choices import trackers_selected as selected
from distillrun.errors import Pruned
from distillrun.runs import artifacts

FINAL = ("complete", "failed", "interrupted", "pruned")
# The run's final status as MLflow's; a pruned trial finished (tagged status=pruned).
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED"}
PARENT_FILE = ".mlflow_parent.json"  # in a sweep folder: the parent run its jobs report to


class Observer(Protocol):
    name: str

    def epoch(self, record: dict[str, Any]) -> None: ...

    def end(self, manifest: dict[str, Any]) -> None: ...


def warn(name: str, error: BaseException) -> None:
    text = " ".join(str(error).split())[:200] or type(error).__name__
    print(
        f"distillrun: warning: {name} logging stopped ({type(error).__name__}: {text}); "
        "the run goes on, its run folder is complete",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------- hooks of Run


def manifest_written(run: Any, manifest: dict[str, Any]) -> None:
    """Start the run's observers with its first manifest; end them with its final one."""
    status = manifest.get("status")
    if status == "running" and not run.observers_started:
        run.observers_started = True
        run.observers = _start(run, manifest)
    elif status in FINAL:
        observers, run.observers = run.observers, []
        for observer in observers:
            _guarded(observer, "end", manifest)


def epoch(run: Any, record: dict[str, Any]) -> None:
    for observer in list(run.observers):
        if not _guarded(observer, "epoch", record):
            run.observers.remove(observer)


def _guarded(observer: Observer, method: str, arg: dict[str, Any]) -> bool:
    try:
        getattr(observer, method)(arg)
        return True
    except Pruned:
        raise
    except Exception as e:
        warn(observer.name, e)
        return False


def _start(run: Any, manifest: dict[str, Any]) -> list[Observer]:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    config = manifest.get("config") or {}
    logger = config.get("logger") or {}
    makers = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}
    observers: list[Observer] = []
    for name in selected(logger):
        try:
            observers.append(makers[name](run.dir, manifest, hydra_cfg))
        except Exception as e:
            warn(name, e)
    if hydra_cfg is not None:
        from distillrun.integrations import (
            search,  # no optuna unless the search's sweeper runs this job
        )

        try:
            trial = search.trial_observer(hydra_cfg, run.dir)
        except Exception as e:  # the study cannot be reached: the run goes on, unpruned
            warn("search", e)
            trial = None
        if trial is not None:
            observers.append(trial)
    return observers


# ----------------------------------------------------------------------------- MLflow


def mlflow_uri(logger: dict[str, Any], output_root: str) -> str:
    uri = (logger.get("mlflow") or {}).get("tracking_uri")
    return uri or f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def _mlflow_client(logger: dict[str, Any], output_root: str) -> Any:
    # A server that is down must not be retried for minutes: a warning, and the run goes on.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    for name in ("alembic", "mlflow"):  # a new local store logs its database migrations
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=mlflow_uri(logger, output_root))


def _experiment_id(client: Any, name: str, output_root: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A local store keeps artifacts beside it; a server keeps them where it is configured to.
    local = client.tracking_uri.startswith(("sqlite:", "file:"))
    where = (Path(output_root).resolve() / "mlartifacts" / name).as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=where)
    except Exception:  # a parallel job created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """{"train.epochs": "40", ...}: the composed config as MLflow params."""
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(config) if isinstance(config, list) else str(config)}


def _numbers(items: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in items.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _log_batch(client: Any, run_id: str, **lists: list[Any]) -> None:
    """MLflow takes at most 1000 metrics and 100 params or tags per batch."""
    for key, values in lists.items():
        size = 1000 if key == "metrics" else 100
        for i in range(0, len(values), size):
            client.log_batch(run_id, **{key: values[i : i + size]})


class MlflowTracker:
    """One MLflow run per run folder; a sweep's jobs are children of its parent run."""

    name = "mlflow"

    def __init__(self, run_dir: Path, manifest: dict[str, Any], hydra_cfg: Any) -> None:
        from mlflow.entities import Param, RunTag

        config = manifest["config"]
        logger, root = config.get("logger") or {}, config["paths"]["output_root"]
        self.client = _mlflow_client(logger, root)
        self.run_dir = run_dir
        name = logger.get("experiment") or manifest["stage"]
        experiment = _experiment_id(self.client, name, root)
        tags = {
            "stage": manifest["stage"],
            "status": "running",
            "run_dir": str(run_dir.resolve()),
            "code_version": str(manifest.get("code_version")),
            "overrides": " ".join(manifest.get("overrides") or []) or "-",
            "command": str(manifest.get("command")),
        }
        if manifest.get("resumed"):  # the run continued in its folder: a new MLflow run
            tags["resumed"] = ", ".join(manifest["resumed"])
        parent = _parent_run(hydra_cfg)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_name = " ".join(manifest.get("overrides") or []) or run_dir.name
        if parent:
            run_name = f"{run_dir.name}: {run_name}"
        self.run_id = self.client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
        _log_batch(self.client, self.run_id, params=params)
        self.tag = RunTag

    def epoch(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        model, step = record.get("model", "model"), int(record.get("epoch", 0))
        now = int(time.time() * 1000)
        values = _numbers({k: v for k, v in record.items() if k != "epoch"})
        metrics = [Metric(f"{model}/{k}", v, now, step) for k, v in values.items()]
        _log_batch(self.client, self.run_id, metrics=metrics)

    def end(self, manifest: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        status = manifest["status"]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in _numbers(manifest.get("metrics") or {}).items()]
        tags = {"status": status, **{f"input.{k}": v for k, v in manifest["inputs"].items()}}
        if manifest.get("error"):
            tags["error"] = str(manifest["error"])[:5000]
        _log_batch(
            self.client,
            self.run_id,
            metrics=metrics,
            tags=[self.tag(k, v) for k, v in tags.items()],
        )
        self.client.log_artifact(self.run_id, str(self.run_dir / artifacts.MANIFEST))
        if (self.run_dir / ".hydra").is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / ".hydra"), ".hydra")
        for plot in sorted(self.run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(plot))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


def _parent_run(hydra_cfg: Any) -> str | None:
    """The sweep's parent run, which `TrackingCallback` recorded in the sweep folder."""
    from hydra.types import RunMode

    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    path = Path(hydra_cfg.sweep.dir) / PARENT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_id")


def _logger(config: DictConfig) -> dict[str, Any]:
    node = config.get("logger")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


class TrackingCallback(Callback):
    """Hydra callback: a `-m` sweep with logger=mlflow is one parent run, its jobs children."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logger = _logger(config)
        if "mlflow" not in selected(logger):
            return
        folder = Path(config.hydra.sweep.dir)
        try:
            client = _mlflow_client(logger, config.paths.output_root)
            name = logger.get("experiment") or config.hydra.job.name
            experiment = _experiment_id(client, name, config.paths.output_root)
            overrides = list(config.hydra.overrides.task)
            tags = {
                "stage": config.hydra.job.name,
                "status": "running",
                "run_dir": str(folder.resolve()),
                "code_version": artifacts.code_version(),
                "overrides": " ".join(overrides) or "-",
            }
            run = client.create_run(experiment, run_name=f"sweep {folder.name}", tags=tags)
            artifacts.write_json(folder / PARENT_FILE, {"run_id": run.info.run_id})
        except Exception as e:
            warn("mlflow", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        parent = folder / PARENT_FILE
        if not parent.is_file():
            return
        logger = _logger(config)
        try:
            from mlflow.entities import RunTag

            client = _mlflow_client(logger, config.paths.output_root)
            run_id = json.loads(parent.read_text())["run_id"]
            statuses = []
            for job in artifacts.sweep_jobs(folder):
                manifest = artifacts.read_manifest(job) or {}
                statuses.append(manifest.get("status", "unfinished"))
            ok = all(s in ("complete", "pruned") for s in statuses)
            status = "complete" if ok else "failed"
            counts = {s: str(statuses.count(s)) for s in set(statuses)}
            tags = [RunTag("status", status), *(RunTag(f"jobs.{k}", v) for k, v in counts.items())]
            client.log_batch(run_id, tags=tags)
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix in (".csv", ".png", ".yaml", ".json"):
                    if not path.name.startswith("."):
                        client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, MLFLOW_STATUS.get(status, "FAILED"))
        except Exception as e:
            warn("mlflow", e)


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Event files in the run folder: a scalar per epoch, model and metric; at the end the
    run's overrides as hyperparameters and its final metrics (the hparams plugin)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, manifest: dict[str, Any], hydra_cfg: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.overrides = manifest.get("overrides") or []

    def epoch(self, record: dict[str, Any]) -> None:
        model, step = record.get("model", "model"), int(record.get("epoch", 0))
        for key, value in _numbers({k: v for k, v in record.items() if k != "epoch"}).items():
            self.writer.add_scalar(f"{model}/{key}", value, step)
        self.writer.flush()

    def end(self, manifest: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        params: dict[str, Any] = {"status": manifest["status"]}
        for item in self.overrides:
            key, _, value = item.partition("=")
            params[key.lstrip("+~")] = _number_or_text(value)
        metrics = {f"final/{k}": v for k, v in _numbers(manifest.get("metrics") or {}).items()}
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, 0)
        for summary in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value
