"""What every stage does around its own work: validate, pick the device, write the manifest.

The manifest is written last, atomically: "complete" with the metrics, or "failed" with the
error. A run killed outright leaves no manifest at all, and so is never consumed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distillrun import artifacts
from distillrun.config import validate
from distillrun.console import error_line
from distillrun.errors import UserError
from distillrun.train import pick_device


@dataclass
class Run:
    """A stage's run folder and what its manifest will record besides the metrics."""

    stage: str
    dir: Path
    device: torch.device
    inputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def log(self, record: dict[str, Any]) -> None:
        artifacts.append_jsonl(self.dir / "metrics.jsonl", record)


def run_stage(
    stage: str, cfg: DictConfig, body: Callable[[DictConfig, Run], dict[str, Any]]
) -> float | None:
    """Run `body` in the Hydra run folder; return the validation accuracy (None without a
    validation split) for Hydra's optimising sweepers."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    record: dict[str, Any] = {
        "stage": stage,
        "status": "running",
        "started": artifacts.now(),
        "seed": cfg.seed,
        "overrides": list(hydra_cfg.overrides.task),
        "code_version": artifacts.code_version(),
        "libraries": artifacts.library_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    run = Run(stage, run_dir, torch.device("cpu"))
    try:
        validate(stage, cfg)
        threads = job_threads(cfg.threads, hydra_cfg.launcher, _cores())
        if threads is not None:
            torch.set_num_threads(threads)
        record["threads"] = torch.get_num_threads()
        run.device = pick_device(cfg.device)
        metrics = body(cfg, run)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        _write_failed(run, record, status, e)
        if isinstance(e, UserError) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            error_line(stage, str(e))
            sys.exit(2)
        raise
    artifacts.write_manifest(
        run_dir,
        **{**record, "status": "complete", "ended": artifacts.now()},
        device=str(run.device),
        inputs=run.inputs,
        **run.info,
        metrics=metrics,
    )
    return metrics.get("val_accuracy")  # for sweepers; never the test set


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def job_threads(setting: Any, launcher: DictConfig, cores: int) -> int | None:
    """torch threads for this job: `threads=N`, or the cores shared fairly among the jobs a
    parallel launcher runs at once, so jobs x threads does not oversubscribe the machine.
    None: one job at a time, torch's own default (one thread per physical core)."""
    if setting != "auto":
        return int(setting)
    target = str(launcher.get("_target_", ""))
    if "joblib_launcher" in target:
        n_jobs = launcher.get("n_jobs") or -1
        parallel = n_jobs if n_jobs > 0 else cores + 1 + n_jobs  # joblib: -1 is every core
        return max(1, cores // max(1, parallel))
    if "submitit_launcher" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)  # what SLURM (or submitit_local) gives each job
    return None


def _write_failed(run: Run, record: dict[str, Any], status: str, error: BaseException) -> None:
    try:
        artifacts.write_manifest(
            run.dir,
            **{**record, "status": status, "ended": artifacts.now()},
            error=f"{type(error).__name__}: {error}",
            inputs=run.inputs,
        )
    except OSError:
        pass  # the folder itself is the problem (unwritable, disk full): report the first error


def train_one(
    run: Run,
    cfg: DictConfig,
    label: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    seed: int,
    jitter_pixels: int = 0,
) -> Any:
    """Train one model with progress bars, logging each epoch to metrics.jsonl as `label`."""
    from distillrun.console import training_bars
    from distillrun.train import batch_bounds, fit

    batches = len(batch_bounds(len(x), cfg.train.batch_size))
    with training_bars(cfg.progress, label, cfg.train.epochs, batches) as bars:

        def on_epoch(record: dict[str, Any]) -> None:
            run.log({"model": label, **record})
            bars.epoch(record)

        return fit(
            model,
            x,
            loss_fn,
            x_val=x_val,
            y_val=y_val,
            optim=cfg.optim,
            epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size,
            seed=seed,
            jitter_pixels=jitter_pixels,
            max_norm=cfg.model.get("max_norm"),
            eval_batch_size=cfg.train.eval_batch_size,
            on_epoch=on_epoch,
            on_batch=bars.batch,
        )
