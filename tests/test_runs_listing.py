"""`distillrun runs`: run and sweep folders newest first, `--latest`, and inputs pinned for a
rerun. Run folders are written here as the stages leave them (a manifest, `.hydra/`), in process."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import DISTILLRUN, assert_one_line_error
from omegaconf import OmegaConf

from distillrun.errors import UserError
from distillrun.integrations import search
from distillrun.runs import artifacts
from distillrun.runs.listing import entries, latest_run, pin_inputs, runs_command, table


def write_run(
    folder: Path, stage: str, started: str, status: str = "complete", **fields: Any
) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    fields = {"dataset": {"name": "digits"}, **fields}
    artifacts.write_manifest(folder, stage=stage, status=status, started=started, **fields)
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Teachers, then a distill run on them, then a distill sweep with one failed job."""
    out = tmp_path / "outputs"
    teachers = write_run(
        out / "train-teachers" / "t1",
        "train-teachers",
        "2026-01-01T10",
        metrics={"test_accuracy": 0.9},
    )
    inputs = {"teachers": str(teachers.resolve())}
    write_run(
        out / "distill" / "d1",
        "distill",
        "2026-01-01T11",
        inputs=inputs,
        metrics={"test_accuracy": 0.5},
    )
    sweep = out / "distill" / "multirun" / "s1"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    for job, (status, accuracy) in enumerate(
        [("complete", 0.7), ("failed", None), ("complete", 0.6)]
    ):
        write_run(
            sweep / str(job),
            "distill",
            f"2026-01-01T12:0{job}",
            status,
            inputs=inputs,
            metrics={"test_accuracy": accuracy} if accuracy else {},
        )
    killed = out / "train-teachers" / "killed"
    (killed / ".hydra").mkdir(parents=True)  # no manifest yet: dated by the folder's time
    os.utime(killed, (1.7e9, 1.7e9))  # 2023
    return out


def test_runs_and_sweeps_are_listed_newest_first_with_what_they_consumed(root: Path) -> None:
    listed = entries(root)
    assert [e.folder.name for e in listed][:3] == ["s1", "d1", "t1"]
    sweep, run, teachers = listed[:3]
    assert (sweep.sweep, sweep.status, sweep.metric) == (True, "2/3 complete", "0.6000-0.7000")
    assert (run.stage, run.status, run.data, run.metric) == (
        "distill",
        "complete",
        "digits",
        "0.5000",
    )
    assert run.inputs == sweep.inputs == {"teachers": [str(teachers.folder.resolve())]}
    assert listed[3].folder.name == "killed" and listed[3].status == "unfinished"
    assert [e.folder.name for e in entries(root, "train-teachers")] == ["t1", "killed"]
    shown = table(listed).splitlines()
    assert shown[0].split() == ["folder", "stage", "status", "data", "test_accuracy", "inputs"]
    assert "distill (sweep)" in shown[1] and shown[1].endswith(
        f"teachers={teachers.folder.resolve()}"
    )


def test_latest_is_the_newest_complete_run_a_sweep_job_included(root: Path) -> None:
    assert latest_run(root, "distill") == root / "distill" / "multirun" / "s1" / "2"
    write_run(root / "distill" / "d2", "distill", "2026-01-02", "interrupted")  # newer, unfinished
    assert latest_run(root, "distill").name == "2"
    assert latest_run(root, "train-teachers").name == "t1"
    write_run(root / "import-teachers" / "i1", "import-teachers", "2026-02-01")
    assert latest_run(root, "train-teachers").name == "t1"  # that stage's own runs only
    with pytest.raises(UserError, match="no complete export run under .*distillrun export"):
        latest_run(root, "export")


def test_the_command_prints_one_path_or_refuses_in_one_line(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs_command(["--latest", "train-teachers", "--root", str(root)])
    assert capsys.readouterr().out == f"{root / 'train-teachers' / 't1'}\n"
    with pytest.raises(UserError, match="unknown stage 'distil' \\(did you mean 'distill'\\?\\)"):
        runs_command(["distil", "--root", str(root)])
    with pytest.raises(UserError, match="--latest"):
        runs_command(["--latest"])
    done = subprocess.run(
        [DISTILLRUN, "runs", "--latest", "distil"], capture_output=True, text=True
    )
    assert_one_line_error(done, "unknown stage 'distil'", "did you mean 'distill'")


def test_a_rerun_names_the_inputs_the_run_used() -> None:
    manifest = {
        "config": {"teachers": None, "T": 2.0},
        "inputs": {"teachers": "/runs/t 1", "generalist": "/runs/g"},  # generalist: not a key
    }
    assert pin_inputs(["T=2", "teachers=x"], manifest) == ["T=2", 'teachers="/runs/t 1"']
    several = {"config": {"teachers": None}, "inputs": {"teachers": "[/runs/a, /runs/b]"}}
    assert pin_inputs([], several) == ["teachers=[/runs/a,/runs/b]"]
    assert pin_inputs(["T=2"], {}) == ["T=2"]


def test_best_yaml_pins_the_teachers_of_the_best_trial(tmp_path: Path) -> None:
    """A search run on the default teachers ("the newest"): its best.yaml and its run-it-again
    line name the teachers folder the trials read."""
    from hydra_plugins.distillrun_search.optuna_sweeper import OptunaSearchConf

    folder, teachers = tmp_path / "search", "/runs/teachers 1"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})
    settings = {"n_trials": 1, "pruner": "none"}
    config.hydra.sweeper = OmegaConf.merge(OmegaConf.structured(OptunaSearchConf), settings)

    class Launcher:
        def launch(self, jobs: list[list[str]], initial_job_idx: int) -> list[Any]:
            for number, _ in enumerate(jobs, initial_job_idx):
                run_dir = folder / str(number)
                run_dir.mkdir(parents=True)
                (run_dir / "metrics.jsonl").write_text('{"model": "student", "epoch": 1}\n')
                artifacts.write_manifest(
                    run_dir,
                    stage="distill",
                    status="complete",
                    config={"teachers": None},
                    inputs={"teachers": teachers},
                    metrics={"val_errors": 1, "val_nll": 0.1},
                )
            return [SimpleNamespace(return_value=None) for _ in jobs]

    search.run_search(config, Launcher(), ["T=interval(1,4)"])
    assert OmegaConf.load(folder / "best.yaml").teachers == teachers
    again = next(
        ln for ln in (folder / "best.yaml").read_text().splitlines() if "Run it again" in ln
    )
    assert shlex.split(again.split(": ", 1)[1])[-1] == f'teachers="{teachers}"'  # in a shell
    assert json.loads((folder / "search.json").read_text())["best"]["overrides"][-1] == (
        f'teachers="{teachers}"'
    )


def test_tab_completes_the_runs_command_and_its_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from distillrun.cli import complete

    for line, offered in [
        ("distillrun ru", ["runs"]),
        ("distillrun runs --latest di", ["distill"]),
        ("distillrun runs --l", ["--latest"]),
    ]:
        monkeypatch.setenv("COMP_LINE", line)
        complete(["-sc", "query=bash"])
        assert capsys.readouterr().out.split() == offered, line


def test_a_reports_command_line_names_the_inputs_the_run_used(tmp_path: Path) -> None:
    from distillrun.runs.summary import command

    run = write_run(
        tmp_path / "d",
        "distill",
        "2026-01-01T10",
        overrides=["T=2"],
        config={"teachers": None, "T": 2},
        inputs={"teachers": "/runs/t1"},
    )
    assert command(run) == "distillrun distill T=2 teachers=/runs/t1"
