"""logger=mlflow / tensorboard and hydra/sweeper=optuna, read back through the trackers' and
Optuna's own APIs."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import DISTILLRUN, assert_one_line_error, distillrun, distillrun_here, manifest
from omegaconf import OmegaConf

from distillrun.config import RESUME_ENV
from distillrun.errors import UserError
from distillrun.integrations import search
from distillrun.runs import artifacts, summary

TEACHER = ["teachers.n=1", "train.epochs=2", "model.hidden=[32]", "progress=false", "threads=1"]
STUDENT = ["model.hidden=[16]", "progress=false", "baseline=false", "threads=1"]
SPACE = ["T=tag(log,interval(1,32))", "alpha=interval(0,1)"]
SEARCH = ["-m", "hydra/sweeper=optuna", *SPACE, "hydra.sweeper.n_trials=6"]
SEARCH += ["hydra.sweeper.n_startup_trials=2", "hydra.sweeper.n_warmup_steps=1"]


@pytest.fixture(scope="module")
def cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one tiny complete train-teachers run."""
    cwd = tmp_path_factory.mktemp("tracking")
    distillrun_here(cwd, "train-teachers", *TEACHER)
    return cwd


def sweeps(cwd: Path) -> list[Path]:
    base = cwd / "outputs" / "distill" / "multirun"
    return sorted(base.iterdir()) if base.is_dir() else []


def search_config(folder: Path, **settings: Any) -> Any:
    """What Hydra hands the sweeper: its settings (the defaults, then `settings`) and the folder."""
    from hydra_plugins.distillrun_search.optuna_sweeper import OptunaSearchConf

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})
    config.hydra.sweeper = OmegaConf.merge(OmegaConf.structured(OptunaSearchConf), settings)
    return config


class FakeLauncher:
    """Hydra's launcher, in process and instant: a job "runs" by appending an epoch to its
    metrics.jsonl and writing the manifest that `ends[trial number]` gives it (status, metrics)."""

    def __init__(self, folder: Path, ends: dict[int, tuple[str, dict[str, Any]]]) -> None:
        self.folder, self.ends = folder, ends
        self.launched: dict[int, list[str]] = {}

    def launch(self, jobs: list[list[str]], initial_job_idx: int) -> list[Any]:
        for number, overrides in enumerate(jobs, initial_job_idx):
            self.launched[number] = list(overrides)
            write_job(self.folder / str(number), *self.ends.get(number, ("complete", {})))
        return [SimpleNamespace(return_value=None) for _ in jobs]


def write_job(run_dir: Path, status: str, metrics: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"model": "student", "epoch": 1}\n')
    artifacts.write_manifest(run_dir, stage="distill", status=status, metrics=metrics)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside MLflow's SQLAlchemy store
def test_a_sweep_logged_to_mlflow_and_tensorboard_reads_back(cwd: Path) -> None:
    """Two jobs, one failing (class 99 does not exist): MLflow's parent and children, params,
    per-epoch metrics and statuses; TensorBoard's scalars and hparams."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    args = ["-m", "transfer.omit_classes=[99],[]", "T=3", "train.epochs=2", *STUDENT]
    result = distillrun(cwd, "distill", *args, "logger=[mlflow,tensorboard]", check=2)
    assert "warning" not in result.stderr, result.stderr
    folder = sweeps(cwd)[-1]
    failed, done = artifacts.sweep_jobs(folder)

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distill")
    runs = {r.data.tags["run_dir"]: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs[str(folder.resolve())]
    assert parent.info.status == "FAILED" and parent.data.tags["jobs.failed"] == "1"
    assert "summary.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    child, bad = runs[str(done.resolve())], runs[str(failed.resolve())]
    for run in (child, bad):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["T"] == "3" and run.data.params["train.epochs"] == "2"
        assert run.data.tags["stage"] == "distill"
    assert child.info.status == "FINISHED" and child.data.tags["status"] == "complete"
    assert bad.info.status == "FAILED" and "class ids [99]" in bad.data.tags["error"]
    epochs = [r for r in artifacts.read_jsonl(done / "metrics.jsonl") if r["model"] == "student"]
    history = client.get_metric_history(child.info.run_id, "student/val_errors")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_errors"]) for r in epochs]
    assert child.data.metrics["test_errors"] == manifest(done)["metrics"]["test_errors"]
    assert child.data.tags["input.teachers"] == manifest(done)["inputs"]["teachers"]
    paths = [a.path for a in client.list_artifacts(child.info.run_id)]
    assert "manifest.json" in paths and ".hydra" in paths

    events = EventAccumulator(str(done))
    events.Reload()
    scalars = events.Scalars("student/val_errors")
    assert [(s.step, s.value) for s in scalars] == [(r["epoch"], r["val_errors"]) for r in epochs]
    assert events.Scalars("final/test_errors")[0].value == manifest(done)["metrics"]["test_errors"]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["T"].number_value == 3
    assert start.hparams["transfer.omit_classes"].string_value == "[]"


@pytest.mark.slow
def test_an_unreachable_tracker_is_one_warning_and_the_run_goes_on(cwd: Path) -> None:
    uri = "logger.mlflow.tracking_uri=http://127.0.0.1:9"
    result = distillrun(cwd, "distill", "train.epochs=1", *STUDENT, "logger=mlflow", uri)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "warning: mlflow logging stopped" in lines[0], result.stderr
    runs = sorted(p for p in (cwd / "outputs" / "distill").iterdir() if p.name != "multirun")
    assert manifest(runs[-1])["status"] == "complete"


def test_bad_loggers_and_search_spaces_are_one_line_before_any_run_folder(tmp_path: Path) -> None:
    cases = [
        (["logger=mlfow"], "did you mean 'mlflow'"),
        (["logger=[mlflow,tensorbord]"], "unknown logger 'tensorbord'"),
        (["-m", "T=interval(1,32)"], "add -m hydra/sweeper=optuna"),
        (["-m", "hydra/sweeper=optuna", "T=tag(log,interval(0,32))"], "needs low > 0"),
        (["-m", "hydra/sweeper=optuna", "alpha=interval(0,2)"], "alpha=2.0 must be in [0, 1]"),
        (["-m", "hydra/sweeper=optuna", "T=tag(logg,interval(1,2))"], "unknown tag logg"),
        (["-m", "hydra/sweeper=optuna", "T=3"], "needs a search space"),
        (["-m", "hydra/sweeper=optuna", *SPACE, "hydra.sweeper.pruner=mean"], "choose one of"),
        (
            ["-m", "hydra/sweeper=optuna", *SPACE, "hydra.sweeper.objective=[test_errors]"],
            "test_errors is not a validation metric",
        ),
    ]
    for args, fragment in cases:
        assert_one_line_error(distillrun_here(tmp_path, "distill", *args, check=None), fragment)
    assert not (tmp_path / "outputs").exists()  # no run folder, no sweep folder, no study


def test_trackers_and_optuna_are_imported_only_when_selected() -> None:
    code = (
        "import sys, distillrun.cli, distillrun.stages.common, distillrun.integrations.search; "
        "print(sorted(m for m in ('mlflow', 'optuna', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Three trials whose validation and test metrics rank them differently: on validation errors,
# ties broken by NLL, trial 2 is best (trial 1 without the tie-break); on validation ECE trial
# 0; on any test metric another one.
RANKED = {
    0: {"val_errors": 5, "val_nll": 0.3, "val_ece": 0.01, "test_errors": 1, "test_nll": 0.1},
    1: {"val_errors": 2, "val_nll": 0.9, "val_ece": 0.20, "test_errors": 3, "test_nll": 0.2},
    2: {"val_errors": 2, "val_nll": 0.1, "val_ece": 0.30, "test_errors": 9, "test_nll": 0.9},
}
for m in RANKED.values():
    m["test_ece"] = 0.5 - m["val_ece"]


@pytest.mark.parametrize(
    "objective, chosen, wording",
    [
        (
            ["val_errors", "val_nll"],
            2,
            "val_errors 2, val_nll 0.1 (chosen on the validation "
            "split by val_errors, then val_nll)",
        ),
        (["val_ece"], 0, "val_ece 0.01 (chosen on the validation split by val_ece)"),
    ],
    ids=["val_errors_then_nll", "val_ece"],
)
def test_the_objective_is_validation_errors_then_nll(
    tmp_path: Path, objective: list[str], chosen: int, wording: str
) -> None:
    """The search picks its best trial on the validation metrics it was given, never the test
    split's, and best.yaml says which metrics chose it."""
    folder = tmp_path / "sweep"
    launcher = FakeLauncher(folder, {n: ("complete", m) for n, m in RANKED.items()})
    config = search_config(folder, n_trials=3, pruner="none", objective=objective)
    search.run_search(config, launcher, SPACE)
    assert sorted(launcher.launched) == [0, 1, 2]
    assert json.loads((folder / "search.json").read_text())["best"]["trial"] == chosen
    text = (folder / "best.yaml").read_text()
    assert f"# The best trial ({chosen}) " in text and wording in text
    searched = dict(o.split("=") for o in launcher.launched[chosen])
    assert OmegaConf.load(folder / "best.yaml").T == float(searched["T"])


def test_an_objective_other_than_validation_metrics_is_refused(tmp_path: Path) -> None:
    for keys, fragment in [
        (["test_errors"], "test_errors is not a validation metric (did you mean 'val_errors'?)"),
        (["val_accuracy"], "use val_errors"),
        (["val_nll", "val_errors"], "name val_nll alone"),
        (["val_errors", "val_nll", "val_ece"], "one or two validation metrics"),
        ("val_errors", "as a list"),
    ]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            search.check_objective(keys)
    assert search.check_objective(["val_errors", "val_nll"]) == ["val_errors", "val_nll"]
    # where no precheck ran (--config-dir, a preset): refused before the sweep folder exists
    config = search_config(tmp_path / "sweep", objective=["test_errors"])
    with pytest.raises(UserError, match="test_errors is not a validation metric"):
        search.run_search(config, FakeLauncher(tmp_path / "sweep", {}), SPACE)
    assert not (tmp_path / "sweep").exists()


def test_a_resumed_search_tells_ended_trials_from_their_manifests(tmp_path: Path) -> None:
    """Killed after trials ended but before their batch returned, the study still has them
    RUNNING: resumed, a trial whose job ended is told from its manifest and never run again;
    one cut off mid-run resumes in its folder; one never started starts; one never launched
    (no settings recorded) fails."""
    import optuna

    folder = tmp_path / "sweep"
    folder.mkdir()
    config = search_config(folder, n_trials=6, pruner="none")
    settings = config.hydra.sweeper
    study = search.open_study(settings, search.open_storage(settings, folder))
    ended = {
        0: ("complete", RANKED[1]),
        1: ("pruned", {"val_errors": 30, "epochs": 2}),
        2: ("failed", {}),
        3: ("running", {}),  # killed mid-run
    }
    for number in range(6):
        trial = study.ask()
        if number < 5:
            trial.set_user_attr("overrides", [f"T={number + 1}", "alpha=0.5"])
        if number in ended:
            run_dir = folder / str(number)
            if number != 3:  # 3: killed before its job recorded its folder in the study
                trial.set_user_attr("run_dir", str(run_dir.resolve()))
            write_job(run_dir, *ended[number])
    before = {n: (folder / str(n) / "metrics.jsonl").read_bytes() for n in range(3)}
    launcher = FakeLauncher(folder, {3: ("complete", RANKED[2]), 4: ("complete", RANKED[0])})

    search.run_search(config, launcher, SPACE)

    assert sorted(launcher.launched) == [3, 4]  # the ended trials 0-2 are not run again
    assert {n: (folder / str(n) / "metrics.jsonl").read_bytes() for n in range(3)} == before
    resume = f"++hydra.job.env_set.{RESUME_ENV}='{(folder / '3').resolve()}'"
    assert launcher.launched[3] == ["T=4", "alpha=0.5", resume]
    assert launcher.launched[4] == ["T=5", "alpha=0.5"]
    study = optuna.load_study(study_name="search", storage=search.storage_url(settings, folder))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "COMPLETE", "FAIL"]
    objective = list(settings.objective)
    assert study.trials[0].value == search.score(RANKED[1], objective)
    assert study.best_trial.number == 3  # RANKED[2]: the one resumed and finished


def test_consecutive_trial_numbers_launch_together() -> None:
    batch = [(5, ["x"]), (2, ["y"]), (3, ["z"])]
    assert [(s, len(g)) for s, g in search._consecutive(batch)] == [(2, 2), (5, 1)]


@pytest.mark.slow
def test_a_search_prunes_resumes_after_a_kill_and_writes_best_yaml(cwd: Path) -> None:
    args = [DISTILLRUN, "distill", *SEARCH, "train.epochs=12", *STUDENT]
    before = set(sweeps(cwd))
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:  # kill -9 in the middle of trial 1
        new = set(sweeps(cwd)) - before
        lines = artifacts.read_jsonl(next(iter(new)) / "1" / "metrics.jsonl") if new else []
        if len(lines) >= 3:
            break
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (folder,) = new
    first = manifest(folder / "0")
    assert first["status"] == "complete" and manifest(folder / "1")["status"] == "running"

    result = distillrun_here(
        cwd, "distill", *SEARCH, "train.epochs=12", *STUDENT, f"hydra.sweep.dir={folder}"
    )
    assert "continuing" in result.stdout and "1 to resume" in result.stdout
    jobs = artifacts.sweep_jobs(folder)
    assert [j.name for j in jobs] == [str(i) for i in range(6)]
    assert manifest(folder / "0") == first  # finished trials are not run again
    assert "resumed" in manifest(folder / "1") and manifest(folder / "1")["status"] == "complete"

    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and "RUNNING" not in states and "PRUNED" in states
    statuses = {j.name: manifest(j)["status"] for j in jobs}
    for trial in study.trials:
        expected = {"COMPLETE": "complete", "PRUNED": "pruned"}[trial.state.name]
        assert statuses[str(trial.number)] == expected
    pruned = [j for j in jobs if statuses[j.name] == "pruned"]
    m = manifest(pruned[0])
    assert not artifacts.is_complete(m, "distill") and m["pruned_at_epoch"] < 12
    assert not (pruned[0] / "resume").exists()
    # The manifest and the study hold the student's validation scores of the epoch it was pruned.
    epoch = m["pruned_at_epoch"]
    lines = artifacts.read_jsonl(pruned[0] / "metrics.jsonl")
    (last,) = [r for r in lines if r["model"] == "student" and r["epoch"] == epoch]
    for key in ("val_errors", "val_nll"):
        assert m["metrics"][key] == last[key], key
    reported = study.trials[int(pruned[0].name)].intermediate_values
    assert reported[epoch] == search.score(last, ["val_errors", "val_nll"])

    best = study.best_trial
    done = [j for j in jobs if statuses[j.name] == "complete"]
    key = {j.name: search.score(manifest(j)["metrics"], ["val_errors", "val_nll"]) for j in done}
    assert str(best.number) == min(key, key=key.get)  # chosen on validation, never test
    preset = OmegaConf.load(folder / "best.yaml")
    searched = dict(o.split("=") for o in best.user_attrs["searched"])
    assert preset.T == float(searched["T"]) and preset.alpha == float(searched["alpha"])
    assert preset.experiment.stage == "distill"
    conf = cwd / "my-conf" / "experiment"
    conf.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "best.yaml", conf / "best.yaml")
    shown = distillrun_here(
        cwd, "distill", "--config-dir", str(conf.parent), "+experiment=best", "--cfg", "job"
    ).stdout
    assert f"T: {searched['T']}" in shown
    info = json.loads((folder / "search.json").read_text())
    assert info["best"]["trial"] == best.number and info["trials"]["pruned"] == len(pruned)
    with open(folder / "summary.csv") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == sorted(statuses.values())
    assert (folder / "errors_by_trial.png").stat().st_size > 1000
    assert not (folder / "heatmap.png").exists()

    distillrun_here(cwd, "report", str(folder))
    (report,) = (cwd / "outputs" / "report").iterdir()
    text = (report / "report.md").read_text()
    assert "| pruned |" in text and "![errors_by_trial](errors_by_trial.png)" in text
    assert "hydra/sweeper=optuna" in text


def test_a_summary_of_a_search_counts_pruned_trials_as_finished(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, (status, metrics) in enumerate(
        [("complete", {"val_errors": 9, "test_errors": 12}), ("pruned", {"val_errors": 20})]
    ):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        artifacts.write_manifest(
            sweep / str(job),
            stage="distill",
            status=status,
            overrides=[f"T={job}"],
            metrics=metrics,
        )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / summary.SEARCH_FILE).write_text("{}")
    rows = summary.collect(sweep)
    files = summary.summarise(rows, sweep, "search")
    assert [f.name for f in files] == ["summary.csv", "errors_by_trial.png"]
    columns, cells = summary.table_rows(rows)
    assert columns[:4] == ["run", "overrides", "status", "val errors"]
    assert [c[2:4] for c in cells] == [["complete", 9], ["pruned", 20]]


def test_best_yaml_turns_group_overrides_into_preset_defaults(tmp_path: Path) -> None:
    best = {
        "trial": 3,
        "overrides": ["model=cnn", "+T=2.5", "train.epochs=7", "hydra.job.chdir=false"],
        "metrics": {"val_errors": 4, "val_nll": 0.2},
    }
    search.write_best(tmp_path / "best.yaml", best, "distill", tmp_path, ["val_errors"])
    text = (tmp_path / "best.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    preset = OmegaConf.load(tmp_path / "best.yaml")
    assert OmegaConf.to_container(preset.defaults) == [{"override /model": "cnn"}]
    assert preset.T == 2.5 and preset.train.epochs == 7 and "hydra" not in preset
    assert preset.experiment == {"name": "best", "stage": "distill"}


@pytest.mark.slow
def test_parallel_joblib_trials_share_the_study(cwd: Path) -> None:
    args = ["-m", "hydra/sweeper=optuna", *SPACE, "hydra.sweeper.n_trials=2"]
    args += ["hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    distillrun(cwd, "distill", *args, "train.epochs=2", *STUDENT)
    folder = sweeps(cwd)[-1]
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:  # each worker process reported its epochs to the one study
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.user_attrs["run_dir"] == str((folder / str(trial.number)).resolve())
    pids = {manifest(job)["environment"]["pid"] for job in artifacts.sweep_jobs(folder)}
    assert len(pids) == 2


@pytest.mark.slow
def test_the_wheel_ships_the_sweeper_where_hydra_finds_it(
    built_wheel: Path, tmp_path: Path
) -> None:
    """Installed from the wheel, Hydra's own plugin scan finds hydra/sweeper=optuna (an
    editable install hides it from that scan; the dispatcher registers it then)."""
    import zipfile

    wheel = built_wheel
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    assert (tmp_path / "site" / "distillrun" / "conf" / "logger" / "mlflow.yaml").is_file()
    code = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
        "found = Plugins.instance().discover(Sweeper); "
        "print(sorted(f'{p.__module__}.{p.__name__}' for p in found))"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert "distillrun_search.optuna_sweeper.OptunaSearchSweeper" in out.stdout, out.stderr
