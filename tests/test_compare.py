"""`make compare` (python -m distillrun.tools.compare): every step's command composes and
validates, the MNIST setting reuses named teachers, and the digits setting end to end with one
epoch per model and two seeds: the runs, the report's figures against the runs' manifests,
resuming, and its errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import manifest, tool, tool_here
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from distillrun.cli import preset_as_choice
from distillrun.config import validate
from distillrun.runs import artifacts
from distillrun.stages import config_name
from distillrun.tools.compare import SETTINGS, methods, plan

FAST = ["train.epochs=1", "progress=false"]
ROOT = Path("/comparison")


def composed(stage: str, overrides: list[str]):
    """As the command composes them (`+experiment=` is read as `experiment=` at the door)."""
    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        return compose(config_name=config_name(stage), overrides=preset_as_choice(overrides))


def test_every_step_composes_and_validates_with_its_method_settings() -> None:
    steps = plan(ROOT, list(SETTINGS), ["dataset.root=m"], [], seeds=3)
    by_name = {step.name: step for step in steps}
    for name, setting in SETTINGS.items():
        assert by_name[f"{name}/teachers"].stage == "train-teachers"
        for method in methods(setting):
            step = by_name[f"{name}/{method.name}"]
            assert step.sweep == {"seed": ["0", "1", "2"]}
            cfg = composed("distill", [*step.overrides, "seed=1"])
            validate("distill", cfg)
            assert cfg.baseline is (method is setting.kd)  # the hard labels once, with KD
            assert cfg.teachers == str(ROOT / name / "teachers")
            assert cfg.dataset.name == ("mnist" if setting.needs_mnist else "digits")
            assert (cfg.augment.name, cfg.augment.pixels) == ("shift", 1)
            for override in method.overrides:  # the method's settings reach the run
                key, value = override.split("=")
                actual = cfg.loss.name if key == "loss" else OmegaConf.select(cfg, key)
                assert str(actual).lower() == value or float(actual) == float(value), override
    mnist = composed("distill", by_name["mnist_3pct_views/dkd"].overrides)
    assert (mnist.transfer.fraction, mnist.train.epochs, mnist.model.hidden) == (
        0.03,
        300,
        [800, 800],
    )
    assert (mnist.loss.name, mnist.T, mnist.alpha, mnist.loss.beta_n) == ("dkd", 4.0, 0.5, 8.0)
    kd = composed("distill", by_name["mnist_3pct_views/kd"].overrides)
    assert (kd.loss.name, kd.T, kd.alpha) == ("kd", 20, 1.0)  # the preset's, chosen on validation


def test_named_teachers_replace_the_mnist_teachers_step_and_one_seed_is_no_sweep() -> None:
    given = Path("/reproduction/teachers")
    steps = plan(ROOT, list(SETTINGS), [], [], seeds=1, teachers=given)
    names = [step.name for step in steps]
    assert "mnist_3pct_views/teachers" not in names and "digits/teachers" in names
    for step in steps:
        assert step.sweep == {}
        if step.name.startswith("mnist_3pct_views/"):
            assert f"teachers={given}" in step.overrides
        elif step.stage == "distill":
            assert f"teachers={ROOT / 'digits' / 'teachers'}" in step.overrides


# --- the digits setting end to end --------------------------------------------------------------


def compare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return tool("compare", cwd, *args)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("compare")
    result = tool_here("compare", cwd, "--settings", "digits", "--seeds", "2", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    (root,) = (cwd / "outputs" / "compare").iterdir()
    assert f"{root / 'report.md'}" in result.stdout
    return root


def jobs(folder: Path) -> list[dict]:
    return [manifest(job) for job in artifacts.sweep_jobs(folder)]


@pytest.mark.slow
def test_each_method_is_a_seed_sweep_of_complete_runs_of_its_loss(comparison: Path) -> None:
    digits = comparison / "digits"
    assert artifacts.is_complete(manifest(digits / "teachers"), "train-teachers")
    for method in methods(SETTINGS["digits"]):
        runs = jobs(digits / method.name)
        assert [run["config"]["seed"] for run in runs] == [0, 1]
        for run in runs:
            assert artifacts.is_complete(run, "distill"), method.name
            assert run["config"]["teachers"] == str(digits / "teachers")
            loss = run["config"]["loss"]
            assert f"loss={loss['name']}" in method.overrides or loss["name"] == "kd"
            assert loss["standardize"] is ("loss.standardize=true" in method.overrides)
            assert ("baseline_test_errors" in run["metrics"]) is (method.name == "kd")


@pytest.mark.slow
def test_report_json_holds_each_methods_mean_and_sd_from_the_runs(comparison: Path) -> None:
    r = json.loads((comparison / "report.json").read_text())
    digits = r["settings"]["digits"]
    assert (
        digits["teacher_ensemble_errors"]
        == (manifest(comparison / "digits" / "teachers")["metrics"]["test_errors"])
    )
    assert list(digits["methods"]) == ["hard", *(m.name for m in methods(SETTINGS["digits"]))]
    for name, row in digits["methods"].items():
        runs = jobs(comparison / "digits" / ("kd" if name == "hard" else name))
        key = "baseline_test_errors" if name == "hard" else "test_errors"
        values = [run["metrics"][key] for run in runs]
        assert row["test_errors"]["values"] == values, name
        assert row["test_errors"]["mean"] == pytest.approx(sum(values) / 2)
        assert row["test_errors"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        assert row["seeds"] == [0, 1]
    assert r["seeds"] == 2 and 0 < r["minutes"] < 10 and r["minutes_goal"] == 30


@pytest.mark.slow
def test_report_md_has_a_row_per_method_with_its_figures_and_command(comparison: Path) -> None:
    text = (comparison / "report.md").read_text()
    r = json.loads((comparison / "report.json").read_text())
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | test errors |")
    for row in r["settings"]["digits"]["methods"].values():
        (line,) = [line for line in rows if line.startswith(f"| {row['label']} |")]
        errors = row["test_errors"]
        assert f"**{errors['mean']:.1f} ± {errors['std']:.1f}**" in line
        assert row["source"] in line
        assert "distillrun distill -m seed=0,1" in line and "hydra.sweep.dir=digits/" in line
    assert "seeds 0-1." in text


@pytest.mark.slow
def test_resume_reruns_the_missing_job_and_keeps_the_rest(comparison: Path) -> None:
    cwd = comparison.parents[2]
    kept = (comparison / "digits" / "dkd" / "0" / "manifest.json").stat().st_mtime_ns
    artifacts.remove_tree(comparison / "digits" / "nkd" / "1")
    (comparison / "report.json").unlink()
    result = tool_here(
        "compare", cwd, "--settings", "digits", "--seeds", "2", "--resume", str(comparison), *FAST
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (comparison / "digits" / "dkd" / "0" / "manifest.json").stat().st_mtime_ns == kept
    assert manifest(comparison / "digits" / "nkd" / "1")["config"]["seed"] == 1
    r = json.loads((comparison / "report.json").read_text())
    assert r["settings"]["digits"]["methods"]["nkd"]["seeds"] == [0, 1]


@pytest.mark.slow
def test_resume_with_other_arguments_is_one_line(comparison: Path) -> None:
    cwd = comparison.parents[2]
    result = compare(cwd, "--settings", "digits", "--resume", str(comparison), *FAST)
    assert result.returncode == 2, result.stderr
    assert "resume it with the same" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.slow
def test_teachers_not_trained_on_mnist_are_refused_in_one_line(comparison: Path) -> None:
    teachers = str(comparison / "digits" / "teachers")
    result = compare(comparison, "--settings", "mnist_3pct_views", "--teachers", teachers)
    assert result.returncode == 2, result.stderr
    assert "was trained on dataset=digits" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (comparison / "outputs").exists()  # refused before any folder is made
