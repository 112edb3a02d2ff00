"""train-teachers, specialists, evaluate and distill through the CLI, on a tiny hierarchical:
in this process (conftest.distillrun_here), and in subprocesses for the kill and its resume."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    ONE_THREAD,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
    metric_lines,
    runs,
    signal_when,
    start,
    tool_here,
    without_timings,
)

from distillrun.runs import artifacts
from distillrun.tools.reproduce_specialists import GOALS, grouped

pytestmark = pytest.mark.slow  # runs of the command (most in this process, some in subprocesses)

DATA = [
    "dataset=hierarchical",
    "dataset.n_super=4",
    "dataset.n_sub=3",
    "dataset.dim=8",
    "dataset.train_per_class=30",
    "dataset.test_per_class=10",
]
QUIET = ["progress=false", "train.batch_size=32"]
GENERALIST = [*DATA, *QUIET, "teachers.n=1", "train.epochs=3", "model.hidden=[32]"]
SPECIALISTS = [*DATA, *QUIET, "specialists.k=4", "train.epochs=2"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generalist, its specialists and their evaluation, in one working directory."""
    cwd = tmp_path_factory.mktemp("specialists")
    distillrun_here(cwd, "train-teachers", *GENERALIST)
    distillrun_here(cwd, "specialists", *SPECIALISTS)
    distillrun_here(cwd, "evaluate", "progress=false")
    return cwd


def test_specialists_write_clusters_plot_and_corrected_checkpoints(pipeline: Path) -> None:
    (generalist,) = runs(pipeline, "train-teachers")
    (folder,) = runs(pipeline, "specialists")
    m = manifest(folder)
    assert m["status"] == "complete" and m["inputs"] == {"generalist": str(generalist.resolve())}
    clusters = json.loads((folder / "clusters.json").read_text())
    assert sorted(c for s in clusters["clusters"] for c in s) == list(range(12))  # a partition
    assert clusters["superclass"] == [c // 3 for c in range(12)]
    assert -1 <= m["metrics"]["cluster_ari"] == clusters["cluster_ari"] <= 1
    assert (folder / "covariance.png").read_bytes()[:4] == b"\x89PNG"
    assert m["specialists"]["trained"] == list(range(len(clusters["clusters"])))
    for i, classes in enumerate(clusters["clusters"]):
        ckpt = torch.load(folder / f"specialist_{i}.pt", weights_only=True)
        assert ckpt["classes"] == classes and ckpt["num_classes"] == len(classes) + 1
        info = m["metrics"]["members"][i]
        # log((n - n_special) / n_special): positive when S^m is under half the data
        n = m["dataset"]["sizes"]["train"]
        expected = math.log((n - info["train_examples"]) / info["train_examples"])
        assert ckpt["dustbin_correction"] == pytest.approx(expected)
    info = m["metrics"]["members"][0]
    assert info["dustbin_correction"] == pytest.approx(
        torch.log(torch.tensor(info["oversampling_factor"])).item(), rel=1e-5
    )


def test_evaluate_reports_both_accuracies_and_the_coverage_table(pipeline: Path) -> None:
    (spec,) = runs(pipeline, "specialists")
    (folder,) = runs(pipeline, "evaluate")
    m = manifest(folder)
    assert m["status"] == "complete" and m["inputs"]["specialists"] == str(spec.resolve())
    metrics = m["metrics"]
    for key in ("generalist_accuracy", "combined_accuracy", "combined_conditional_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["test_accuracy"] == pytest.approx(metrics["combined_accuracy"])
    rows = metrics["by_coverage"]
    assert sum(r["examples"] for r in rows) == m["dataset"]["sizes"]["test"] == 120
    assert {"covering", "examples", "relative_change"} <= set(rows[0])
    assert (folder / "by_coverage.png").read_bytes()[:4] == b"\x89PNG"
    logits = torch.load(folder / "logits.pt", weights_only=True)
    assert logits["fingerprint"] == m["dataset"]["fingerprint"]
    for split, n in m["dataset"]["sizes"].items():
        assert logits[split].shape == (1, n, 12)
        assert torch.allclose(logits[split].exp().sum(-1), torch.ones(1, n), atol=1e-4)


def test_distill_takes_the_combination_as_its_teacher(pipeline: Path) -> None:
    (folder,) = runs(pipeline, "evaluate")
    result = distillrun_here(
        pipeline,
        "distill",
        f"teachers={folder}",
        *DATA,
        *QUIET,
        "train.epochs=2",
        "model.hidden=[16]",
        "baseline=false",
    )
    (student,) = runs(pipeline, "distill")
    m = manifest(student)
    assert m["status"] == "complete" and m["inputs"]["teachers"] == str(folder.resolve())
    assert m["metrics"]["teacher_test_accuracy"] == pytest.approx(
        manifest(folder)["metrics"]["combined_accuracy"]
    )
    # the table puts the generalist next to its combination and the distilled net
    for label in ("generalist (of the evaluate run)", "generalist + specialists (KL combination)"):
        assert label in result.stdout


def test_index_jobs_are_collected_from_their_sweep(pipeline: Path, tmp_path: Path) -> None:
    (generalist,) = runs(pipeline, "train-teachers")
    distillrun_here(
        tmp_path,
        "specialists",
        "-m",
        "specialists.index=0,1,2,3",
        f"generalist={generalist}",
        "specialists.soft_targets=true",
        *SPECIALISTS,
    )
    (sweep,) = (tmp_path / "outputs/specialists/multirun").iterdir()
    one_job = sweep / "0"
    assert manifest(one_job)["specialists"]["trained"] == [0]
    result = distillrun_here(tmp_path, "evaluate", f"specialists={one_job}", check=None)
    assert_one_line_error(result, "holds specialist(s) [0] of 4", "multirun folder")
    distillrun_here(tmp_path, "evaluate", f"specialists={sweep}", "progress=false")
    # With no folder named, the newest job's sweep is found and collected the same way.
    distillrun_here(tmp_path, "evaluate", "progress=false")
    done = [f for f in runs(tmp_path, "evaluate") if manifest(f)["status"] == "complete"]
    assert [manifest(f)["inputs"]["specialists"] for f in done] == [str(sweep.resolve())] * 2


def test_bad_specialists_input_is_a_one_line_error(tmp_path: Path) -> None:
    result = distillrun_here(tmp_path, "evaluate", "specialists=/no/such/run", check=None)
    assert_one_line_error(result, "/no/such/run does not exist")
    result = distillrun_here(tmp_path, "specialists", *SPECIALISTS, check=None)
    assert_one_line_error(result, "no complete train-teachers run")
    result = distillrun_here(tmp_path, "specialists", "specialists.k=1", check=None)
    assert_one_line_error(result, "specialists.k=1")


def test_a_specialists_run_killed_mid_specialist_resumes_to_the_same_numbers(
    pipeline: Path, tmp_path: Path
) -> None:
    (generalist,) = runs(pipeline, "train-teachers")
    args = [*SPECIALISTS, f"generalist={generalist}", "train.epochs=4", "train.checkpoint_every=0"]
    whole = tmp_path / "whole"
    distillrun_here(tmp_path, "specialists", *args, f"hydra.run.dir={whole}", env=ONE_THREAD)

    proc = start(tmp_path, "specialists", *args)
    # specialist 1's checkpoint appears after its first epoch: the kill lands inside it
    signal_when(proc, "outputs/specialists/*/resume/specialist_1.pt", tmp_path, signal.SIGKILL)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    (killed,) = runs(tmp_path, "specialists")
    assert manifest(killed)["status"] == "running"
    assert not (killed / "specialist_1.pt").exists()

    distillrun(tmp_path, "specialists", f"resume={killed}", env=ONE_THREAD)
    resumed, reference = manifest(killed), manifest(whole)
    assert resumed["status"] == "complete" and len(resumed["resumed"]) == 1
    assert without_timings(resumed["metrics"]) == without_timings(reference["metrics"])
    assert metric_lines(killed) == metric_lines(whole)  # no line lost, none twice
    assert (killed / "clusters.json").read_text() == (whole / "clusters.json").read_text()
    for m in range(len(resumed["specialists"]["clusters"])):
        name = f"specialist_{m}.pt"
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name


# jft_like's generator settings made equal to DATA's, so the pipeline's runs are its steps.
AS_DATA = [
    "dataset.n_super=4",
    "dataset.n_sub=3",
    "dataset.dim=8",
    "dataset.train_per_class=30",
    "dataset.test_per_class=10",
    "dataset.modes=1",
    "dataset.mode_spread=0.0",
    "dataset.cross_modes=0.0",
    "train.epochs=1",
    "progress=false",
]


def test_reproduce_specialists_resumes_from_the_pipeline_and_reports(pipeline: Path) -> None:
    # The pipeline's generalist, specialists and evaluate runs stand for a reproduction's first
    # three steps; resuming it runs only the two distillations, then the report.
    root = pipeline / "reproduction"
    root.mkdir()
    for name, stage in (("generalist", "train-teachers"), ("specialists", "specialists")):
        (root / name).symlink_to(runs(pipeline, stage)[0])
    (root / "evaluate").symlink_to(runs(pipeline, "evaluate")[0])
    # The state as reproduce-specialists wrote it before its arguments were grouped: resumable.
    state = {"overrides": AS_DATA, "command": "python -m distillrun.tools.reproduce_specialists"}
    artifacts.write_json(root / "reproduce.json", {**state, "seconds": {}})
    result = tool_here("reproduce_specialists", pipeline, "--resume", str(root), *AS_DATA)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("complete: kept") == 3
    back, control = manifest(root / "distill_back"), manifest(root / "distill_generalist")
    assert back["inputs"]["teachers"] == str((root / "evaluate").resolve())
    assert control["inputs"]["teachers"] == str((root / "generalist").resolve())

    r = json.loads((root / "report.json").read_text())
    ev = manifest(root / "evaluate")["metrics"]
    g, c = ev["generalist_accuracy"], ev["combined_accuracy"]
    assert r["relative_gain"] == pytest.approx((c - g) / g)
    assert r["by_coverage"] == grouped(ev["by_coverage"])
    assert sum(x["examples"] for x in r["by_coverage"]) == 120
    assert r["distilled_back_accuracy"] == back["metrics"]["test_accuracy"]
    assert r["hard_labels_accuracy"] == back["metrics"]["baseline_test_accuracy"]
    assert r["distilled_from_generalist_accuracy"] == control["metrics"]["test_accuracy"]
    assert 0 < r["generalist_train_accuracy"] <= 1
    for name, (key, op, target) in GOALS.items():
        value = r[key]
        expected = {"<=": value <= target, ">=": value >= target, ">": value > target}
        assert r["goals_met"][name] is expected.get(op, value == target), name
    text = (root / "report.md").read_text()
    assert "| covering | paper: examples |" in text and "| 4+ | 79,321 |" in text
    assert f"{r['minutes']:.1f} minutes" in result.stdout
