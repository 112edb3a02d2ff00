"""Hyperparameter search with Optuna: `distillrun <stage> -m hydra/sweeper=optuna
'T=tag(log,interval(1,32))' 'alpha=interval(0,1)' hydra.sweeper.n_trials=30`.

The sweeper (hydra_plugins/distillrun_search) asks Optuna's TPE sampler for trials and runs
each as an ordinary job through whatever launcher is configured: job number = trial number, one
run folder per trial. The study lives in SQLite in the sweep folder, so the same command with
`hydra.sweep.dir=<that folder>` continues a killed search: finished trials are kept, trials cut
off mid-run resume in their own folders from their last epoch. Inside each job, `TrialObserver`
reports the monitored model's per-epoch validation score to the study and raises
`errors.Pruned` when the pruner says the trial is hopeless. The objective is measured on the
validation split (errors, ties broken by NLL), never on the test split: an objective naming
any other metric is refused before anything runs.

Optuna is imported only by the sweeper and by the jobs it runs.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distillrun.config import GROUPS, RESUME_ENV, did_you_mean
from distillrun.errors import UserError
from distillrun.runs import artifacts
from distillrun.runs.listing import pin_inputs

SWEEPER = "optuna"  # hydra/sweeper=optuna
TARGET = "OptunaSearchSweeper"
PRUNERS = ("median", "hyperband", "none")
STUDY_FILE = "study.db"
SUMMARY_FILE = "search.json"
BEST_FILE = "best.yaml"
EXAMPLE = "'T=tag(log,interval(1,32))' 'alpha=interval(0,1)'"
# The validation metrics a run's manifest records (metrics.classification_metrics, "val"), each
# minimised; val_accuracy is their one maximised sibling and ranks exactly like val_errors.
OBJECTIVE_KEYS = ("val_errors", "val_nll", "val_ece")
# Manifest statuses of a job that ended: its trial is told to the study, never run again.
ENDED = ("complete", "pruned", "failed")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space, from a sweep override."""

    key: str
    kind: str  # float, int or categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {', '.join(map(str, self.choices))}"
        return f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")


def _key(override: Any) -> str:
    prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
    return f"{prefix}{override.get_key_element()}"


def parse_space(overrides: list[Any]) -> tuple[list[Param], list[str]]:
    """The search space (interval, choice and range sweeps) and the fixed task overrides."""
    space, fixed = [], []
    for o in overrides:
        if o.key_or_group == "hydra" or o.key_or_group.startswith(("hydra.", "hydra/")):
            continue
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        value = o.value()
        if o.is_interval_sweep():
            unknown = set(value.tags) - {"log", "int"}
            if unknown:
                raise UserError(
                    f"{o.input_line}: unknown tag {', '.join(sorted(unknown))}; an interval takes "
                    "the tags log and int, e.g. 'T=tag(log,interval(1,32))'"
                )
            low, high, log = value.start, value.end, "log" in value.tags
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise UserError(f"{o.input_line}: an interval needs low < high, e.g. interval(1,8)")
            if log and low <= 0:
                raise UserError(f"{o.input_line}: a log interval needs low > 0, e.g. interval(1,8)")
            kind = "int" if "int" in value.tags else "float"
            space.append(Param(_key(o), kind, low, high, log))
        else:  # choice(...), a,b,c or range(...): one of these values
            space.append(Param(_key(o), "categorical", choices=tuple(o.sweep_iterator())))
    return space, fixed


def check_objective(keys: Any) -> list[str]:
    """The objective's keys, or a UserError: one or two validation metrics to minimise, the
    second only breaking the ties of val_errors (a whole number; the others have none)."""
    example = "e.g. hydra.sweeper.objective=[val_errors,val_nll]"
    listed = isinstance(keys, Sequence) and not isinstance(keys, str)
    if not listed or not 1 <= len(keys) <= 2:
        shown = f"[{','.join(map(str, keys))}]" if listed else keys
        raise UserError(
            f"hydra.sweeper.objective={shown}: name one or two validation metrics as a list, "
            f"the second breaking ties, {example}"
        )
    keys = [str(k) for k in keys]
    for key in keys:
        if key == "val_accuracy":
            raise UserError(
                "hydra.sweeper.objective: the search minimises, and val_accuracy is maximised: "
                "use val_errors, which ranks the trials the same"
            )
        if key not in OBJECTIVE_KEYS:
            raise UserError(
                f"hydra.sweeper.objective: {key} is not a validation metric"
                f"{did_you_mean(key, list(OBJECTIVE_KEYS))}; the validation split chooses and "
                f"the test split only reports: choose from {', '.join(OBJECTIVE_KEYS)}"
            )
    if len(keys) == 2 and keys[0] != "val_errors":
        raise UserError(
            f"hydra.sweeper.objective=[{','.join(keys)}]: only val_errors (a whole number) has "
            f"ties for a second metric to break: name {keys[0]} alone, or {example}"
        )
    return keys


def space_combinations(overrides: list[Any]) -> list[list[str]]:
    """For the dispatcher's precheck: with hydra/sweeper=optuna, refuse a bad search space and
    return the configs to validate at both ends of each interval (T=interval(0,32) fails there,
    before any run folder); without it, refuse an interval, which only a search can use."""
    chosen = [o for o in overrides if o.key_or_group == "hydra/sweeper"]
    intervals = [o.input_line for o in overrides if o.is_interval_sweep()]
    if not chosen or chosen[-1].value() != SWEEPER:
        if intervals:
            raise UserError(
                f"{intervals[0]} is a search space: add -m hydra/sweeper=optuna to search it"
            )
        return []
    if importlib.util.find_spec("optuna") is None:
        raise UserError('hydra/sweeper=optuna needs optuna: pip install "distillrun[search]"')
    for o in overrides:
        if o.key_or_group == "hydra.sweeper.pruner" and o.value() not in PRUNERS:
            raise UserError(f"hydra.sweeper.pruner={o.value()}: choose one of {', '.join(PRUNERS)}")
        if o.key_or_group == "hydra.sweeper.objective":
            check_objective(o.value())
    space, fixed = parse_space(overrides)
    if not space:
        raise UserError(f"hydra/sweeper=optuna needs a search space, e.g. -m {EXAMPLE}")
    combos = []
    for p in space:
        if p.kind != "categorical":
            for end in (p.low, p.high):
                combos.append([*fixed, f"{p.key}={int(end) if p.kind == 'int' else end}"])
    return combos


def suggest(trial: Any, p: Param) -> str:
    """Ask the trial for a value of `p`; return it as an override."""
    name = p.key.lstrip("+")
    if p.kind == "categorical":
        value = trial.suggest_categorical(name, list(p.choices))
    elif p.kind == "int":
        value = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
    else:
        value = float(f"{trial.suggest_float(name, p.low, p.high, log=p.log):.4g}")
    return f"{p.key}={value}"


def score(values: dict[str, Any], keys: list[str]) -> float | None:
    """The value to minimise: the first key (validation errors, a whole number), ties broken
    by the second squashed into [0, 1) (validation NLL). None when a key is missing."""
    try:
        parts = [float(values[k]) for k in keys[:2]]
    except (KeyError, TypeError, ValueError):
        return None
    if len(parts) == 2:
        parts[1] = parts[1] / (1 + parts[1]) if parts[1] >= 0 else 0.0
    return sum(parts)


# ----------------------------------------------------------------------------- the study


def storage_url(settings: Any, sweep_dir: Path) -> str:
    return settings.storage or f"sqlite:///{sweep_dir.resolve() / STUDY_FILE}"


def make_pruner(settings: Any) -> Any:
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.n_startup_trials, n_warmup_steps=settings.n_warmup_steps
        )
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.n_warmup_steps))
    return optuna.pruners.NopPruner()


def make_sampler(settings: Any, offset: int = 0) -> Any:
    import optuna

    return optuna.samplers.TPESampler(
        seed=settings.seed + offset, constant_liar=settings.n_jobs > 1
    )


def open_storage(settings: Any, sweep_dir: Path) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(
        storage_url(settings, sweep_dir),
        engine_kwargs={"connect_args": {"timeout": 60}},  # parallel jobs share the file
    )


def open_study(settings: Any, storage: Any) -> Any:
    import optuna

    return optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings),
        pruner=make_pruner(settings),
        direction="minimize",
        load_if_exists=True,
    )


def is_search(hydra_cfg: Any) -> bool:
    return str(hydra_cfg.sweeper.get("_target_", "")).endswith(TARGET)


class TrialObserver:
    """In a search's job: report the monitored model's per-epoch validation score to the
    study and raise `Pruned` when the pruner stops the trial."""

    name = "search"

    def __init__(self, trial: Any, settings: Any, reported: set[int]) -> None:
        self.trial, self.reported = trial, reported  # epochs reported before a kill
        self.monitor, self.objective = settings.monitor, list(settings.objective)

    def epoch(self, record: dict[str, Any]) -> None:
        if record.get("model") != self.monitor:
            return
        value = score(record, self.objective)
        if value is None or int(record["epoch"]) in self.reported:
            return
        self.trial.report(value, int(record["epoch"]))
        if self.trial.should_prune():
            from distillrun.errors import Pruned

            seen = {k: v for k, v in record.items() if k.startswith("val_")}
            raise Pruned(int(record["epoch"]), {**seen, "epochs": int(record["epoch"])})

    def end(self, manifest: dict[str, Any]) -> None:
        pass  # the sweeper tells the study how the trial ended, from the manifest


def trial_observer(hydra_cfg: Any, run_dir: Path) -> TrialObserver | None:
    """The observer of this job's trial, when the search's sweeper launched it."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN or not is_search(hydra_cfg):
        return None
    from optuna.trial import Trial, TrialState

    settings = hydra_cfg.sweeper
    storage = open_storage(settings, Path(hydra_cfg.sweep.dir))
    study = open_study(settings, storage)
    study_id = storage.get_study_id_from_name(settings.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, hydra_cfg.job.num)
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return None
    trial = Trial(study, trial_id)
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    return TrialObserver(trial, settings, set(frozen.intermediate_values))


# ----------------------------------------------------------------------------- the sweeper


def run_search(config: Any, launcher: Any, arguments: list[str]) -> None:
    """The search: ask, launch, tell, until `n_trials` trials have finished."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.trial import TrialState

    from distillrun.console import say

    settings = config.hydra.sweeper
    check_objective(settings.objective)  # also when no precheck ran (--config-dir, a preset)
    space, fixed = parse_space(OverridesParser.create().parse_overrides(arguments))
    folder = Path(config.hydra.sweep.dir)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, folder / "multirun.yaml")
    study = open_study(settings, open_storage(settings, folder))
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    # Trials a kill cut off: told from their manifests when their job had ended, otherwise
    # relaunched first, each resuming in its own run folder.
    leftover = _settle_ended(study, running, folder, settings, say)
    if study.trials:
        # A fresh sampler with the same seed would propose the killed search's points again.
        study.sampler = make_sampler(settings, offset=len(study.trials))
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        say(f"search: continuing {folder} ({done} trials finished, {len(leftover)} to resume)")
    while True:
        batch = [(t.number, _resumed(t, folder)) for t in leftover[: settings.n_jobs]]
        leftover = leftover[len(batch) :]
        finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        room = settings.n_trials - finished - len(batch) - len(leftover)
        for _ in range(min(settings.n_jobs - len(batch), room)):
            trial = study.ask()
            searched = [suggest(trial, p) for p in space]
            trial.set_user_attr("searched", searched)
            trial.set_user_attr("overrides", [*fixed, *searched])
            overrides = [*fixed, *searched]
            batch.append((trial.number, overrides))
        if not batch:
            break
        returns = []
        for start, group in _consecutive(batch):
            jobs = [job_overrides for _, job_overrides in group]
            returns += launcher.launch(jobs, initial_job_idx=start)
        for number, _ in batch:
            _tell(study, number, folder, settings, say)
        for job in returns:
            job.return_value  # noqa: B018 - re-raises a job's bug with its trace, as Hydra's sweeper does
    write_results(study, folder, settings, space)


def _settle_ended(
    study: Any, running: list[Any], folder: Path, settings: Any, say: Any
) -> list[Any]:
    """Of the trials a kill left RUNNING, tell the study those whose job had ended (its batch
    had not returned yet), from their manifests as if it had; return the ones to relaunch.
    Relaunched, an ended job would start again from scratch, its resume/ folder gone."""
    from optuna.trial import TrialState

    relaunch = []
    for trial in running:
        if "overrides" not in trial.user_attrs:  # killed between ask and launch: never ran
            study.tell(trial.number, state=TrialState.FAIL)
            say(f"trial {trial.number}: never launched, its settings unrecorded -> failed")
        elif _manifest(trial, folder).get("status") in ENDED:
            _tell(study, trial.number, folder, settings, say)
        else:  # running when killed, interrupted, or not started: it resumes or starts
            relaunch.append(trial)
    return relaunch


def _resumed(trial: Any, folder: Path) -> list[str]:
    overrides = list(trial.user_attrs.get("overrides", []))
    run_dir = _run_dir(trial, folder)
    if run_dir.is_dir():
        quoted = str(run_dir.resolve()).replace("\\", "\\\\").replace("'", "\\'")
        overrides.append(f"++hydra.job.env_set.{RESUME_ENV}='{quoted}'")
    return overrides


def _consecutive(batch: list[tuple[int, list[str]]]) -> list[tuple[int, list[Any]]]:
    """Runs of consecutive trial numbers: a launcher numbers its jobs from initial_job_idx."""
    groups: list[tuple[int, list[Any]]] = []
    for number, overrides in sorted(batch):
        if groups and groups[-1][0] + len(groups[-1][1]) == number:
            groups[-1][1].append((number, overrides))
        else:
            groups.append((number, [(number, overrides)]))
    return groups


def _run_dir(trial: Any, folder: Path) -> Path:
    return Path(trial.user_attrs.get("run_dir") or folder / str(trial.number))


def _manifest(trial: Any, folder: Path) -> dict[str, Any]:
    try:
        return artifacts.read_manifest(_run_dir(trial, folder)) or {}
    except UserError:
        return {}


def _tell(study: Any, number: int, folder: Path, settings: Any, say: Any) -> None:
    from optuna.trial import TrialState

    trial = study.trials[number]
    manifest = _manifest(trial, folder)
    run_dir = _run_dir(trial, folder)
    status = artifacts.reported_status(run_dir, manifest) if manifest else "unfinished"
    value = score(manifest.get("metrics") or {}, list(settings.objective))
    shown = " ".join(trial.user_attrs.get("searched", []))
    if status == "complete" and value is not None:
        study.tell(number, value)
        say(f"trial {number}: {shown} -> {value:.4f}")
    elif status == "pruned":
        study.tell(number, state=TrialState.PRUNED)
        say(f"trial {number}: {shown} -> pruned after epoch {manifest.get('pruned_at_epoch')}")
    else:
        study.tell(number, state=TrialState.FAIL)
        say(f"trial {number}: {shown} -> {status}")


def write_results(study: Any, folder: Path, settings: Any, space: list[Param]) -> None:
    """search.json (the study in brief) and best.yaml (the best trial's overrides)."""
    from optuna.trial import TrialState

    from distillrun.console import say

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    epochs = 0
    for t in trials:
        records = artifacts.read_jsonl(_run_dir(t, folder) / "metrics.jsonl")
        epochs += sum(r.get("model") == settings.monitor for r in records)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    summary: dict[str, Any] = {
        "study": settings.study_name,
        "storage": storage_url(settings, folder),
        "trials": {k: v for k, v in counts.items() if v},
        "space": {p.key: p.describe() for p in space},
        "objective": list(settings.objective),
        "monitor": settings.monitor,
        "monitored_epochs": epochs,
        "pruner": settings.pruner,
        "seed": settings.seed,
    }
    if best is not None:
        run_dir = _run_dir(best, folder)
        manifest = artifacts.read_manifest(run_dir) or {}
        summary["best"] = {
            "trial": best.number,
            "value": best.value,
            # its input runs pinned: run again later, it reads the same teachers, not the newest
            "overrides": pin_inputs(best.user_attrs.get("overrides", []), manifest),
            "run_dir": str(run_dir),
            "metrics": {k: v for k, v in (manifest.get("metrics") or {}).items() if "_" in k},
        }
        stage = manifest.get("stage", "?")
        write_best(folder / BEST_FILE, summary["best"], stage, folder, summary["objective"])
        say(
            f"search: best trial {best.number} of {len(trials)} "
            f"({' '.join(best.user_attrs.get('searched', []))}), objective {best.value:.4f}: "
            f"{folder / BEST_FILE}"
        )
    artifacts.write_json(folder / SUMMARY_FILE, summary)


def write_best(
    path: Path, best: dict[str, Any], stage: str, folder: Path, objective: list[str]
) -> None:
    """The best overrides as an experiment preset: copy it to <dir>/experiment/<name>.yaml and
    run `distillrun <stage> --config-dir <dir> +experiment=<name>`. Its header names the
    objective's keys, which were measured on the validation split (check_objective)."""
    groups, keys = [], []
    for item in best["overrides"]:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            continue
        (groups if key in GROUPS else keys).append(f"{key}={value}")
    body = OmegaConf.from_dotlist(keys)
    body.experiment = {"name": "best", "stage": stage}
    if groups:
        body.defaults = [{f"override /{g.split('=')[0]}": g.split("=", 1)[1]} for g in groups]
    values = ", ".join(f"{k} {best['metrics'].get(k)}" for k in objective)
    header = [
        "# @package _global_",
        f"# The best trial ({best['trial']}) of the search in {folder.resolve()}:",
        f"#   {values} (chosen on the validation split by {', then '.join(objective)}).",
        "# Run it again: distillrun " + stage + " " + shlex.join(best["overrides"]),
        "# or as a preset: copy this file to <dir>/experiment/best.yaml, then",
        f"#   distillrun {stage} --config-dir <dir> +experiment=best",
    ]
    text = "\n".join(header) + "\n" + OmegaConf.to_yaml(body)
    artifacts.atomic_write(path, lambda f: f.write(text), "w")
