"""-m sweeps as results: teachers from a sweep, the shared teacher cache, the summary a sweep
ends with under each launcher, and `distillrun report`."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    DISTILLRUN,
    TINY_STUDENT,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
)
from omegaconf import OmegaConf

from distillrun.cli import folders_to_override
from distillrun.runs import artifacts, summary
from distillrun.stages.common import job_threads

pytestmark = pytest.mark.slow  # runs of the command (most in this process, some in subprocesses)

TEACHER = ["teachers.n=1", "train.epochs=2", "model.hidden=[32]", "progress=false"]


def sweep_folder(root: Path, stage: str) -> Path:
    (folder,) = sorted((root / "outputs" / stage / "multirun").iterdir())[-1:]
    return folder


def csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`train-teachers -m seed=0,1`: two one-member runs, to be used as one ensemble."""
    cwd = tmp_path_factory.mktemp("sweeps")
    distillrun_here(cwd, "train-teachers", "-m", "seed=0,1", *TEACHER)
    return sweep_folder(cwd, "train-teachers")


def test_a_teachers_sweep_ends_with_its_summary(teacher_sweep: Path) -> None:
    rows = csv_rows(teacher_sweep)
    assert [r["seed"] for r in rows] == ["0", "1"]
    assert all(r["status"] == "complete" and r["stage"] == "train-teachers" for r in rows)
    for job, row in zip(artifacts.sweep_jobs(teacher_sweep), rows, strict=True):
        assert int(row["test_errors"]) == manifest(job)["metrics"]["test_errors"]
    assert not list(teacher_sweep.glob("*.png"))  # seeds are not an axis to plot against


def test_a_distill_sweep_on_joblib_shares_one_cache_and_matches_the_sequential_sweep(
    teacher_sweep: Path,
) -> None:
    cwd = teacher_sweep.parents[3]
    args = ["distill", "-m", f"teachers={teacher_sweep}", "T=1,4", *TINY_STUDENT]
    result = distillrun(cwd, *args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "distill sweep: 2 of 2 jobs complete" in result.stdout
    parallel = sweep_folder(cwd, "distill")
    jobs = artifacts.sweep_jobs(parallel)
    caches = [manifest(job)["teacher_cache"] for job in jobs]
    # Both jobs asked for the stacked logits at once; exactly one built them.
    assert sorted(c["built_by_this_run"] for c in caches) == [False, True]
    assert {c["path"] for c in caches} == {str(teacher_sweep.resolve() / "teacher_logits.pt")}
    for job in jobs:
        m = manifest(job)
        assert m["inputs"]["teachers"] == str(teacher_sweep.resolve())
        assert m["environment"]["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        members = [
            manifest(j)["metrics"]["teacher_params"] for j in artifacts.sweep_jobs(teacher_sweep)
        ]
        assert m["metrics"]["teacher_params"] == sum(members)
    rows = csv_rows(parallel)
    assert [r["T"] for r in rows] == ["1", "4"] and len(rows) == 2
    assert (parallel / "errors_vs_T.png").stat().st_size > 1000
    assert not (parallel / "heatmap.png").exists()  # only T varies

    distillrun_here(cwd, *args, "threads=1")
    sequential = sweep_folder(cwd, "distill")
    assert sequential != parallel
    for a, b in zip(jobs, artifacts.sweep_jobs(sequential), strict=True):
        assert manifest(a)["metrics"]["test_nll"] == manifest(b)["metrics"]["test_nll"]
        assert manifest(b)["teacher_cache"]["built_by_this_run"] is False  # built already


def test_distill_takes_the_newest_teachers_sweep_whole_by_default(teacher_sweep: Path) -> None:
    cwd = teacher_sweep.parents[3]
    result = distillrun_here(cwd, "distill", *TINY_STUDENT, "baseline=false")
    assert f"distill: teachers {teacher_sweep.resolve()} (2 members" in result.stdout
    assert "teacher 1 (seed 1)" in result.stdout


def test_teachers_as_a_list_of_runs(teacher_sweep: Path) -> None:
    cwd = teacher_sweep.parents[3]
    a, b = artifacts.sweep_jobs(teacher_sweep)
    result = distillrun_here(cwd, "distill", f"teachers=[{a},{b}]", *TINY_STUDENT, "baseline=false")
    assert "(2 members; stacked their logits into" in result.stdout
    (cache,) = (cwd / "outputs" / "teacher-cache").glob("*/teacher_logits.pt")
    result = distillrun_here(cwd, "distill", f"teachers=[{a},{a}]", *TINY_STUDENT, check=None)
    assert_one_line_error(result, "the same run twice")
    result = distillrun_here(cwd, "distill", f"teachers=[{a},{b}]", *TINY_STUDENT, "baseline=false")
    assert f"logits from {cache}" in result.stdout


def test_an_unfinished_teachers_sweep_is_refused_as_an_ensemble(tmp_path: Path) -> None:
    sweep = tmp_path / "outputs" / "train-teachers" / "multirun" / "2026-01-01"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    result = distillrun_here(tmp_path, "distill", f"teachers={sweep}", *TINY_STUDENT, check=None)
    assert_one_line_error(result, "2 of 2 jobs that are not complete")


def test_a_failing_job_does_not_stop_the_sweep(teacher_sweep: Path) -> None:
    """Class 99 is out of range on digits, which only the job itself can tell."""
    cwd = teacher_sweep.parents[3]
    result = distillrun_here(
        cwd, "distill", "-m", "transfer.omit_classes=[99],[3]", *TINY_STUDENT, check=None
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "class ids [99] out of range" in result.stderr
    folder = sweep_folder(cwd, "distill")
    assert [r["status"] for r in csv_rows(folder)] == ["failed", "complete"]
    where = folder.relative_to(cwd) / "summary.csv"
    assert f"1 of 2 jobs did not complete: see {where}" in result.stderr


def test_sigterm_stops_a_joblib_sweep_and_its_workers(teacher_sweep: Path) -> None:
    cwd = teacher_sweep.parents[3]
    args = [DISTILLRUN, "distill", "-m", "T=1,2,3,4", "train.epochs=200", "progress=false"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    before = set((cwd / "outputs" / "distill" / "multirun").glob("*/*/metrics.jsonl"))
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not set((cwd / "outputs" / "distill" / "multirun").glob("*/*/metrics.jsonl")) - before:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    workers = child_pids(proc.pid)  # joblib's worker processes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err.decode()
    time.sleep(2)
    assert workers and not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def child_pids(pid: int) -> list[int]:
    """The process's direct children, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            out.append(int(stat.parent.name))
    return out


def test_submitit_local_runs_the_sweep_and_its_summary(teacher_sweep: Path) -> None:
    cwd = teacher_sweep.parents[3]
    args = ["-m", f"teachers={teacher_sweep}", "alpha=0.5,0.9", *TINY_STUDENT]
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1"]
    result = distillrun(cwd, "distill", *args, *launcher)
    assert "distill sweep: 2 of 2 jobs complete" in result.stdout
    folder = sweep_folder(cwd, "distill")
    assert [r["alpha"] for r in csv_rows(folder)] == ["0.5", "0.9"]
    assert all(
        manifest(job)["environment"]["torch_threads"] == 1 for job in artifacts.sweep_jobs(folder)
    )
    assert (folder / "errors_vs_alpha.png").is_file()


def test_report_puts_two_sweeps_side_by_side(teacher_sweep: Path) -> None:
    cwd = teacher_sweep.parents[3]
    distillrun_here(cwd, "distill", "-m", "T=1,2", "alpha=0.5,0.9", *TINY_STUDENT, "baseline=false")
    grid = sweep_folder(cwd, "distill")
    assert (grid / "heatmap.png").is_file() and (grid / "errors_vs_T.png").is_file()

    result = distillrun_here(cwd, "report", str(teacher_sweep), str(grid), "title=side by side")
    (folder,) = (cwd / "outputs" / "report").iterdir()
    assert manifest(folder)["status"] == "complete"
    text = (folder / "report.md").read_text()
    assert text.startswith("# side by side")
    assert text.count("| A |") == 2 and text.count("| B |") == 4
    assert "T=2 alpha=0.9" in text and "seed=1" in text
    assert "distillrun train-teachers -m seed=0,1" in text  # how each folder was made
    assert "![heatmap-B](heatmap-B.png)" in text and (folder / "heatmap-B.png").is_file()
    assert len(csv_rows(folder)) == 6
    assert f"B: {grid}" in result.stdout

    result = distillrun_here(cwd, "report", str(cwd / "nowhere"), check=None)
    assert_one_line_error(result, "nowhere does not exist")
    result = distillrun_here(cwd, "report", check=None)
    assert_one_line_error(result, "name the run or sweep folders")


# --- pieces -------------------------------------------------------------------------------------


def fake_run(folder: Path, overrides: list[str], metrics: dict, status: str = "complete") -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if status != "unfinished":
        artifacts.write_manifest(
            folder,
            stage="distill",
            status=status,
            started="2026-01-01T10:00:00+00:00",
            ended="2026-01-01T10:03:00+00:00",
            overrides=overrides,
            metrics=metrics,
        )


def test_summary_rows_plots_and_unfinished_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    points = [(t, a) for t in (1, 4, 20) for a in (0.5, 0.9)]
    for i, (t, a) in enumerate(points):
        metrics = {"test_errors": 10 + i, "baseline_test_errors": 30, "teacher_test_errors": 5}
        fake_run(sweep / str(i), ["seed=3", f"T={t}", f"alpha={a}"], metrics)
    fake_run(sweep / "6", ["seed=3", "T=8", "alpha=0.5"], {}, status="unfinished")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    rows = summary.collect(sweep)
    assert [r.status for r in rows] == ["complete"] * 6 + ["unfinished"]
    assert rows[0].minutes == 3.0 and summary.varying(rows) == ["T", "alpha"]
    columns, cells = summary.table_rows(rows)
    assert columns[:3] == ["run", "overrides", "status"] and cells[1][1] == "T=1 alpha=0.9"
    files = summary.summarise(rows, sweep, "test")
    assert [f.name for f in files] == ["summary.csv", "errors_vs_T.png", "heatmap.png"]
    assert len(csv_rows(sweep)) == 7 and csv_rows(sweep)[-1]["status"] == "unfinished"


def test_threads_per_job_share_the_cores() -> None:
    joblib = OmegaConf.create(
        {
            "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            "n_jobs": -1,
        }
    )
    assert job_threads("auto", joblib, cores=16) == 1  # 16 jobs at once
    joblib.n_jobs = 4
    assert job_threads("auto", joblib, cores=16) == 4
    joblib.n_jobs = 32
    assert job_threads("auto", joblib, cores=16) == 1
    slurm = OmegaConf.create(
        {
            "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
            "cpus_per_task": 8,
        }
    )
    assert job_threads("auto", slurm, cores=64) == 8
    assert job_threads("auto", OmegaConf.create({"_target_": "BasicLauncher"}), cores=4) is None
    assert job_threads(3, joblib, cores=16) == 3


def test_a_misspelled_launcher_is_one_line(tmp_path: Path) -> None:
    result = distillrun_here(tmp_path, "distill", "-m", "T=1,2", "hydra/launcher=joblb", check=None)
    assert_one_line_error(result, "joblb", "choose one of basic joblib submitit_local")
    assert not (tmp_path / "outputs" / "distill").exists()


def test_presets_are_refused_on_the_other_stage(tmp_path: Path) -> None:
    result = distillrun_here(tmp_path, "train-teachers", "+experiment=hinton_mnist", check=None)
    assert_one_line_error(result, "preset for `distillrun distill`", "hinton_mnist_teachers")
    result = distillrun_here(tmp_path, "distill", "+experiment=hinton_mnst", check=None)
    assert_one_line_error(result, "did you mean 'hinton_mnist'")


def test_report_folders_become_the_runs_override() -> None:
    assert folders_to_override(["a/b", "title=x", "--cfg", "job"]) == [
        "title=x",
        "--cfg",
        "job",
        "runs=['a/b']",
    ]
    assert folders_to_override(["it's"]) == ["runs=['it\\'s']"]
    assert folders_to_override(["runs=[a]"]) == ["runs=[a]"]


def test_the_sweep_summary_does_not_import_torch() -> None:
    """The callback runs in the process that launched the sweep, which never needs torch."""
    code = "import sys, distillrun.runs.summary; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_seed_sweep_gets_mean_and_spread_per_setting(tmp_path: Path) -> None:
    def row(seed: str, T: str, acc: float, status: str = "complete") -> summary.Row:
        metrics = {"test_accuracy": acc, "baseline_test_accuracy": acc - 0.01}
        overrides = {"seed": seed, "T": T, "alpha": "0.9"}
        return summary.Row(
            "sweep", tmp_path / f"{seed}{T}", "distill", status, overrides, metrics, 1.0
        )

    rows = [row("0", "4", 0.70), row("1", "4", 0.72), row("2", "4", 0.77), row("0", "8", 0.5)]
    rows.append(row("1", "8", 0.9, status="failed"))  # a failed job counts in no mean
    (group,) = summary.over_seeds(rows)  # T=8 has one complete seed: no spread to give
    assert group.overrides == {"T": "4", "alpha": "0.9"} and group.seeds == ["0", "1", "2"]
    mean, std = group.stats["test_accuracy"]
    assert mean == pytest.approx(0.73) and std == pytest.approx(0.036055512754639)  # n - 1
    assert group.stats["baseline_test_accuracy"][0] == pytest.approx(0.72)
    files = summary.summarise(rows, tmp_path, "test")
    assert tmp_path / "summary_seeds.csv" in files
    with open(tmp_path / "summary_seeds.csv") as f:
        (line,) = list(csv.DictReader(f))
    assert line["T"] == "4" and line["seeds"] == "0 1 2"
    assert float(line["test_accuracy_mean"]) == pytest.approx(0.73)
    columns, cells = summary.seed_table([group])
    assert cells[0][columns.index("test accuracy")] == "0.73 ± 0.036"
    assert summary.over_seeds([row("0", "4", 0.7), row("0", "8", 0.8)]) == []  # no seed sweep
