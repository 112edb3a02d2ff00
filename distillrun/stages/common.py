"""What every stage does around its own work: validate, pick the device, write the manifest,
and resume.

The manifest says "running" from the start (with everything needed to repeat the run), and is
rewritten atomically at the end: "complete" with the metrics, or "failed" / "interrupted" with
the error. A run killed outright stays "running", so it is never consumed; `resume=<folder>`
continues it from the resumable checkpoints its training loops left in `resume/`.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distillrun.config import RESUME_ENV, validate
from distillrun.console import error_line, say, training_bars, warning_line
from distillrun.core import distributed, memory
from distillrun.core.data import Data
from distillrun.core.train import (
    Fit,
    TrainSettings,
    batch_bounds,
    check_speed_settings,
    fit,
    make_deterministic,
    pick_device,
)
from distillrun.errors import UserError, interrupted_exit_code, interruption, stop_on_signals
from distillrun.integrations import tracking
from distillrun.runs import artifacts
from distillrun.runs.listing import pin_inputs
from distillrun.runs.teacher_runs import ChosenTeachers, parse_source

RESUME_DIR = "resume"  # resumable checkpoints of the models in training; removed once complete
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass
class Run:
    """A stage's run folder and what its manifest will record besides the metrics."""

    stage: str
    dir: Path
    device: torch.device
    inputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    resuming: bool = False
    record: dict[str, Any] = field(default_factory=dict)  # the manifest while running
    manifest_written: bool = False
    diverged: dict[str, str] = field(default_factory=dict)  # model label -> why
    observers: list[Any] = field(default_factory=list)  # trackers, the search's pruner
    observers_started: bool = False
    state_dir: Path | None = None  # under torchrun: process 0's folder, where `resume/` is

    def write_manifest(self, record: dict[str, Any], **extra: Any) -> None:
        if "overrides" in record:  # the runs it read are known only once the stage found them
            record = {**record, "command": self.command(record["overrides"], record["config"])}
        manifest = artifacts.write_manifest(
            self.dir, **record, inputs=self.inputs, **self.info, **extra
        )
        self.manifest_written = True
        tracking.manifest_written(self, manifest)

    def command(self, overrides: list[str], config: dict[str, Any]) -> str:
        """The line that runs it again: its overrides, with every input run it has read so far
        pinned to its folder (a default, "the newest", would later name another run)."""
        pinned = pin_inputs(list(overrides), {"config": config, "inputs": self.inputs})
        return shlex.join(["distillrun", self.stage, *pinned])

    def add_input(
        self, key: str, folder: Path | str, runs: list[dict[str, Any]] | None = None
    ) -> None:
        """Record a run folder this run consumes, at once: a resumed run uses the same one.
        `runs`: the identity of each run it stands for (artifacts.run_identity), recorded as
        `input_runs`; a resumed run refuses inputs that are no longer the runs it began with."""
        if runs is not None:
            _check_same_inputs(self, key, runs)
            self.info.setdefault("input_runs", {})[key] = runs
        self.inputs[key] = str(folder)
        if self.manifest_written:
            self.write_manifest(self.record)

    def folder_lost(self) -> bool:
        """Its folder was deleted (or emptied) while it ran: the manifest it wrote is gone, and
        a write since may have made the folder anew, holding only what came after."""
        wrote = self.manifest_written and distributed.is_main()
        return wrote and not (self.dir / artifacts.MANIFEST).is_file()

    def log(self, record: dict[str, Any]) -> None:
        if self.folder_lost():
            raise UserError(_lost_message(self))
        artifacts.append_jsonl(self.dir / "metrics.jsonl", record)
        tracking.epoch(self, record)  # may raise tracking.Pruned
        if "model" in record:
            _test_kill_point(record["model"], record.get("epoch", 0))

    def drop_lines_to_redo(self) -> None:
        """Resuming: keep in metrics.jsonl only the lines of models with a checkpoint, which
        `restore_log` then makes exactly their checkpointed epochs. Every other line will be
        written again: its model trains from its start (killed before its first checkpoint),
        and lines of no model (evaluate's) are computed afresh."""
        path = self.dir / "metrics.jsonl"
        kept = [
            r
            for r in artifacts.read_jsonl(path)
            if isinstance(r.get("model"), str) and self.state_path(r["model"]).is_file()
        ]
        artifacts.write_jsonl(path, kept)

    def restore_log(self, label: str, history: list[dict[str, Any]]) -> None:
        """Resuming `label`: its lines in metrics.jsonl become exactly its checkpointed epochs
        (a kill may have come between a checkpoint and its line, or after a later line)."""
        others = [
            r for r in artifacts.read_jsonl(self.dir / "metrics.jsonl") if r.get("model") != label
        ]
        artifacts.write_jsonl(
            self.dir / "metrics.jsonl", others + [{"model": label, **r} for r in history]
        )

    def state_path(self, label: str) -> Path:
        """Where the training loop of model `label` keeps its resumable checkpoint."""
        return (self.state_dir or self.dir) / RESUME_DIR / f"{label.replace(' ', '_')}.pt"


def resume_command(stage: str, run_dir: Path) -> str:
    return f"`distillrun {stage} resume={run_dir}`"


TEST_KILL_ENV = "DISTILLRUN_TEST_KILL_AFTER"


def _test_kill_point(label: str, epoch: int) -> None:
    """For tests of kill and resume only (unset, nothing happens): with
    DISTILLRUN_TEST_KILL_AFTER="<model>:<epoch>[:<signal>]", this process sends itself the
    signal (KILL unless named: TERM, HUP, INT) once that epoch's line is in metrics.jsonl, or,
    for epoch 0, as that model starts: a kill point a test names exactly."""
    wanted = os.environ.get(TEST_KILL_ENV)
    if not wanted:
        return
    model, at, *name = wanted.split(":")
    if model == label and at == str(epoch):
        os.kill(os.getpid(), getattr(signal, f"SIG{name[0] if name else 'KILL'}"))


def run_stage(
    stage: str, cfg: DictConfig, body: Callable[[DictConfig, Run], dict[str, Any]]
) -> float | None:
    """Run `body` in the Hydra run folder; return the validation accuracy (None without a
    validation split) for Hydra's optimising sweepers.

    Under torchrun, process 0 runs in the run folder; each other process runs the same stage
    in its private temporary folder (cli.torchrun_args), resuming from process 0's checkpoints.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if not distributed.is_main():
        try:
            return _run_locked(stage, cfg, body, hydra_cfg, run_dir)
        finally:
            distributed.stop()
    try:
        lock = artifacts.lock_run_folder(run_dir)
        refuse_complete_run(run_dir)
    except UserError as e:  # another process runs in this folder: leave everything as it is
        error_line(stage, str(e))
        sys.exit(2)
    with lock:  # for the life of the run; the OS releases it if the process is killed
        try:
            return _run_locked(stage, cfg, body, hydra_cfg, run_dir)
        finally:
            distributed.stop()


def _run_locked(
    stage: str,
    cfg: DictConfig,
    body: Callable[[DictConfig, Run], dict[str, Any]],
    hydra_cfg: DictConfig,
    run_dir: Path,
) -> float | None:
    # Only the folder the variable names resumes (a sweep's other jobs start afresh; torchrun
    # runs no sweeps, and its other processes resume process 0's folder).
    resuming = os.environ.get(RESUME_ENV) == str(run_dir.resolve())
    if not distributed.is_main():
        resuming = bool(os.environ.get(RESUME_ENV))
    config = OmegaConf.to_container(cfg, resolve=True)
    record: dict[str, Any] = {
        "stage": stage,
        "status": "running",
        "started": artifacts.now(),
        "seed": cfg.seed,
        "overrides": list(hydra_cfg.overrides.task),
        "command": "",  # pinned to the runs it reads as it finds them (Run.command)
        "code_version": artifacts.code_version(),
        "libraries": artifacts.library_versions(),
        "environment": artifacts.environment(),
        "config": config,
        # while it is unfinished: how to continue it (a run killed outright cannot say so)
        "resume_command": f"distillrun {stage} resume={run_dir.resolve()}",
        "run_id": artifacts.new_run_id(),  # a resumed run keeps its first one
    }
    run = Run(stage, run_dir, torch.device("cpu"), resuming=resuming, record=record)
    run.observers_started = not distributed.is_main()  # trackers: process 0's alone
    try:
        if resuming:
            _continue_record(run, record, config)
        validate(stage, cfg)
        threads = job_threads(cfg.threads, hydra_cfg.launcher, _cores())
        if threads is not None:
            torch.set_num_threads(threads)
        record["environment"]["torch_threads"] = torch.get_num_threads()
        record["environment"]["heap_keeps_freed_memory"] = memory.keep_freed_memory()
        record["determinism"] = make_deterministic(bool(cfg.train.get("compile", False)))
        run.device = distributed.local_device(pick_device(cfg.device))
        check_speed_settings(run.device, cfg.train.precision, cfg.train.compile)
        record["device"] = str(run.device)
        if distributed.launched():
            distributed.start(run.device)
            run.state_dir = Path(distributed.broadcast(str(run_dir)))
            record["processes"] = distributed.world_size()
        if resuming and distributed.is_main():
            run.drop_lines_to_redo()
        run.write_manifest(record)
        with _sigterm_interrupts():
            metrics = body(cfg, run)
        if run.folder_lost():  # never a complete manifest over a part of the run's files
            raise UserError(_lost_message(run))
        done = {**finished(record), "status": "complete", "ended": artifacts.now()}
        if distributed.is_main():  # (the other processes' folders are temporary)
            done["content"] = artifacts.content_hashes(run_dir)
        if run.diverged:  # the run completes, flagged (the sweep summary shows the flag)
            metrics["diverged"] = True
            done["diverged_models"] = run.diverged
        run.write_manifest(done, metrics=metrics)
    except BaseException as e:
        if isinstance(e, tracking.Pruned):  # the search stopped a hopeless trial: not a failure
            pruned = {**finished(record), "status": "pruned", "ended": artifacts.now()}
            run.write_manifest(pruned, **e.fields)
            artifacts.remove_tree(run_dir / RESUME_DIR)
            return None
        if _fail(run, record, e):
            return None
        raise
    artifacts.remove_tree(run_dir / RESUME_DIR)
    return metrics.get("val_accuracy")  # for sweepers; never the test set


def finished(record: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a run that ended for good: nothing to resume."""
    return {k: v for k, v in record.items() if k != "resume_command"}


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


def _continue_record(run: Run, record: dict[str, Any], config: dict[str, Any]) -> None:
    """Resuming: keep the first start and the inputs; refuse a config that changed since."""
    try:
        previous = artifacts.read_manifest(run.dir) or {}
    except UserError:
        previous = {}
    before = as_today(previous.get("config"))
    if before not in (None, config):
        changed = _changed_keys(before, config)
        raise UserError(
            f"{run.dir} was run with another config ({', '.join(changed[:5])} differ: the "
            "defaults changed since?); it cannot be resumed exactly: start a new run"
        )
    record["started"] = previous.get("started", record["started"])
    record["run_id"] = previous.get("run_id", record["run_id"])
    record["resumed"] = [*previous.get("resumed", []), artifacts.now()]
    run.inputs.update(previous.get("inputs", {}))
    if previous.get("input_runs"):
        run.info["input_runs"] = previous["input_runs"]


# Keys added since runs were first recorded, with the value that trains as before them.
ADDED_KEYS = {"train": {"max_batches_per_epoch": None}, "dataset": {"max_per_split": None}}


def as_today(config: Any) -> Any:
    """A config recorded by an older distillrun as it reads today, so such a run resumes:
    `loss: kd` (before `loss=` was a group) is `{name: kd, standardize: false}`, and a key
    added since takes the value that trains as before (ADDED_KEYS)."""
    if not isinstance(config, dict):
        return config
    config = dict(config)
    if isinstance(config.get("loss"), str):
        config["loss"] = {"name": config["loss"], "standardize": False}
    for node, added in ADDED_KEYS.items():
        if isinstance(config.get(node), dict):
            config[node] = {**added, **config[node]}
    return config


def refuse_complete_run(run_dir: Path) -> None:
    """A complete run is never overwritten. The dispatcher refuses such a folder before Hydra
    writes into it (cli._refuse_held_folders); this catches what it cannot see (a launcher's own
    folder layout), before anything but Hydra's `.hydra/` is touched."""
    if os.environ.get(RESUME_ENV) == str(run_dir.resolve()):
        return  # a resume (of a complete run, the dispatcher already said so and stopped)
    held = artifacts.holds_run(run_dir) or {}
    if held.get("status") == "complete":
        raise UserError(
            f"{run_dir} holds a complete {held.get('stage')} run, which is never overwritten: "
            "choose a fresh folder"
        )


def _check_same_inputs(run: Run, key: str, runs: list[dict[str, Any]]) -> None:
    """Resuming: the input runs must be the ones the run began with (same ids, same files)."""
    recorded = run.info.get("input_runs", {}).get(key) if run.resuming else None
    if recorded is None:
        return
    whys = [artifacts.changed_run(before, now) for before, now in zip(recorded, runs, strict=False)]
    if len(recorded) != len(runs):
        whys.insert(0, f"{len(runs)} run(s) where it began with {len(recorded)}")
    why = next((w for w in whys if w), None)
    if why:
        raise UserError(
            f"cannot resume {run.dir} on other {key} than it began with ({why}): start a new run"
        )


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """`kill <pid>` (a scheduler's preemption) and a closed terminal (SIGHUP) end the run like
    Ctrl-C: marked interrupted, with the command that continues it. Under `nohup` SIGHUP stays
    ignored. (Stopping rather than training on with nobody watching: a hangup asks a program
    to stop, and the epoch in progress still finishes and is saved first, so nothing is lost.)"""

    try:
        previous = stop_on_signals()
    except ValueError:  # not the main thread (some launchers): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fail(run: Run, record: dict[str, Any], error: BaseException) -> bool:
    """Mark the run interrupted or failed; user-fixable problems become one line and exit,
    or, in a sweep, let the other jobs go on (True: the error is handled)."""
    interrupted = isinstance(error, KeyboardInterrupt)
    message = _user_message(run, error)
    if run.folder_lost():  # what the run wrote after the deletion is no run: it goes too
        artifacts.remove_tree(run.dir)
    # A resume refused before it started leaves the folder as it was.
    elif (run.manifest_written or not run.resuming) and not isinstance(error, SystemExit):
        status = "interrupted" if interrupted else "failed"
        reason = message or f"{type(error).__name__}: {error}"
        if interrupted:
            reason = f"interrupted ({interruption(error)})"
        try:
            run.write_manifest({**record, "status": status, "ended": artifacts.now()}, error=reason)
        except OSError:
            pass  # the folder itself is the problem (unwritable, disk full): report the first
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    if interrupted:
        if distributed.is_main():  # (the other processes' folders are temporary)
            print(
                f"distillrun {run.stage}: interrupted; continue this run with "
                f"{resume_command(run.stage, run.dir)}",
                file=sys.stderr,
            )
        sys.exit(interrupted_exit_code(error))
    if message:
        error_line(run.stage, message)  # process 0's, for all of them
        if not distributed.is_main() and isinstance(error, OSError):  # this process's own
            print(
                f"distillrun {run.stage}: error: process {distributed.rank()} cannot write "
                f"{error.filename or run.dir} ({error.strerror}): free space there, or point "
                "TMPDIR at another folder, then resume the run",
                file=sys.stderr,
            )
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return True  # the sweep's summary lists this job as failed, and it exits 2
        sys.exit(2)
    return False


def _user_message(run: Run, error: BaseException) -> str | None:
    """The one line for a problem the user can fix, None for a bug (which keeps its trace)."""
    if isinstance(error, UserError):
        return str(error)
    if run.folder_lost() and isinstance(error, OSError):
        return _lost_message(run)
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRORS:
        where = error.filename or run.dir
        resume = resume_command(run.stage, run.dir)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left writing {where}: free some disk space, then {resume}"
        return (
            f"cannot write {where} ({error.strerror}): make it writable and {resume}, or choose "
            "another folder with paths.output_root=..."
        )
    return None


def _lost_message(run: Run) -> str:
    return (
        f"the run folder {run.dir} was deleted while the run was writing it: nothing of the run "
        f"is left to resume or use; run `distillrun {run.stage}` again"
    )


def train_settings(cfg: DictConfig, seed: int, **changes: Any) -> TrainSettings:
    """The training settings of a stage's config (`train.*`, `optim`, `model.max_norm`)."""
    settings: dict[str, Any] = {
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "eval_batch_size": cfg.train.eval_batch_size,
        "seed": seed,
        "max_norm": (cfg.get("model") or {}).get("max_norm"),
        "checkpoint_every": cfg.train.checkpoint_every,
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "max_batches_per_epoch": cfg.train.get("max_batches_per_epoch"),
    }
    return TrainSettings(**{**settings, **changes})


def train_one(
    run: Run,
    cfg: DictConfig,
    label: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    settings: TrainSettings,
    **options: Any,
) -> Fit:
    """Train one model with progress bars, logging each epoch to metrics.jsonl as `label`, with
    resumable checkpoints; resuming, it continues (or just loads) that model. `options` go to
    `fit` (`batches`, `val_view`). A run that looks diverged gets a warning line, and its
    manifest says so."""
    batches = len(batch_bounds(len(x), settings.batch_size))
    if settings.max_batches_per_epoch is not None:
        batches = min(batches, settings.max_batches_per_epoch)
    _test_kill_point(label, 0)
    with training_bars(cfg.progress, label, settings.epochs, batches) as bars:

        def on_epoch(record: dict[str, Any]) -> None:
            run.log({"model": label, **record})
            bars.epoch(record)

        try:
            fitted = fit(
                model,
                x,
                loss_fn,
                settings,
                x_val=x_val,
                y_val=y_val,
                on_epoch=on_epoch,
                on_batch=bars.batch,
                state_path=run.state_path(label),
                resume=run.resuming,
                on_resume=lambda history: run.restore_log(label, history),
                **options,
            )
        except UserError as e:
            raise UserError(f"{label}: {e}") from e
    if fitted.diverged:
        run.diverged[label] = fitted.diverged
        warning_line(
            run.stage,
            f"{label} looks diverged: {fitted.diverged}; lower optim.lr "
            f"(now {settings.optim['lr']:g}) and run again",
        )
    return fitted


def resolve_teachers(
    run: Run,
    key: str,
    named: Any,
    find: Callable[[Any, Callable[[str], None]], ChosenTeachers],
    data: Data,
    notes: list[str] | None = None,
) -> ChosenTeachers:
    """The teachers a run consumes (its input `key`: "teachers", or a "generalist"), found by
    `find(named, note)`: `named`, else the ones a resumed run began with, else `find`'s
    default (the newest). Under torchrun process 0 finds them and the other processes take
    its choice (the newest could change meanwhile). Recorded as the run's input, then said as
    its first line: the run folder, the members, the ensemble's validation and test error
    rates; `find`'s notes (and `notes`, the caller's earlier ones) follow that line, or come
    alone when none is found."""
    if named is None and run.resuming:
        named = parse_source(run.inputs.get(key))  # keep what it began with
    notes = [] if notes is None else notes
    try:
        if distributed.is_main():
            chosen = find(named, notes.append)
        source = distributed.broadcast(chosen.source if distributed.is_main() else None)
        if not distributed.is_main():
            chosen = find(parse_source(source), notes.append)
    except Exception:
        for note in notes:  # what was skipped explains why none was found
            say(note)
        raise
    run.add_input(key, chosen.source, chosen.identities)
    say(f"{run.stage}: {key} {chosen.source} ({chosen.summary(data)})")
    for note in notes:
        say(note)
    return chosen
