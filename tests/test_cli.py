"""The `distillrun` command on `digits`: the dispatcher and the stages through it, in this
process (conftest.distillrun_here) where a subprocess adds nothing, and the installed command in
a subprocess for what only a process shows (the console script, a pipe, two runs at once)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import (
    DISTILLRUN,
    TINY_STUDENT,
    TINY_TEACHERS,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
    runs,
)

pytestmark = pytest.mark.slow  # runs of the command (most in this process, some in subprocesses)

# Still a few seconds, but enough steps for the student to learn what the teachers know.
LEARNING_STUDENT = [
    "train.epochs=5",
    "train.batch_size=32",
    "optim.lr=0.01",
    "model.hidden=[16]",
    "progress=false",
]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny complete train-teachers run, shared by the distill tests (which copy nothing)."""
    cwd = tmp_path_factory.mktemp("teachers")
    distillrun_here(cwd, "train-teachers", *TINY_TEACHERS)
    (folder,) = runs(cwd, "train-teachers")
    return folder


# --- the dispatcher -------------------------------------------------------------------------


def test_help_lists_the_stages_without_importing_torch(tmp_path: Path) -> None:
    result = distillrun(tmp_path, "--help")
    for stage in ("train-teachers", "distill"):
        assert stage in result.stdout
    probe = (
        "import sys; from distillrun import cli; sys.argv = ['distillrun', '--help']; cli.main(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
    # a reader that leaves before reading (`| true`, `| head`) is no error: no traceback
    piped = subprocess.run(
        f"'{DISTILLRUN}' --help | true", shell=True, capture_output=True, text=True
    )
    assert piped.stderr == ""


def test_hydra_reads_the_command_line_as_the_dispatcher_expects() -> None:
    """What precheck relies on from Hydra's own argument parser (an internal API)."""
    from distillrun.cli import parse_hydra_args

    parsed = parse_hydra_args(["-m", "T=1,2", "alpha=0.5", "--cfg", "job"])
    assert (parsed.multirun, parsed.overrides, parsed.cfg) == (True, ["T=1,2", "alpha=0.5"], "job")
    parsed = parse_hydra_args(["--help"])
    assert parsed.help and not parsed.multirun and parsed.overrides == []
    parsed = parse_hydra_args(["-sc", "install=bash"])
    assert parsed.shell_completion and parsed.overrides == ["install=bash"]
    for flag in ("config_path", "config_name", "config_dir", "experimental_rerun", "info"):
        assert getattr(parsed, flag) is None, flag
    assert parse_hydra_args(["--hydra-help"]).hydra_help


def test_unknown_stage_suggests_the_closest(tmp_path: Path) -> None:
    assert_one_line_error(distillrun(tmp_path, "distil", check=None), "'distil'", "'distill'")


def test_stage_help_and_cfg_show_config_groups_and_values(tmp_path: Path) -> None:
    helped = distillrun_here(tmp_path, "distill", "--help").stdout
    assert "dataset: " in helped and "digits" in helped and "mnist1d" in helped
    assert "model: " in helped and "hinton_big" in helped
    assert "alpha weights the SOFT term" in helped and "distillrun distill -m" in helped
    cfg = distillrun_here(tmp_path, "distill", "T=20", "alpha=0.5", "--cfg", "job").stdout
    assert "T: 20" in cfg and "alpha: 0.5" in cfg and "teachers: null" in cfg
    assert not (tmp_path / "outputs").exists()


def test_shell_completion_offers_stages_then_the_stage_options(tmp_path: Path) -> None:
    stages = distillrun_here(tmp_path, "-sc", "query=bash", env={"COMP_LINE": "distillrun dis"})
    assert stages.stdout.split() == ["distill"]
    options = distillrun_here(
        tmp_path, "-sc", "query=bash", env={"COMP_LINE": "distillrun distill data"}
    )
    assert "dataset=" in options.stdout.split()
    choices = distillrun_here(
        tmp_path, "-sc", "query=bash", env={"COMP_LINE": "distillrun train-teachers model="}
    )
    assert {"model=cnn", "model=mlp", "model=resnet18"} <= set(choices.stdout.split())


# --- train-teachers then distill ------------------------------------------------------------


def test_train_teachers_writes_a_complete_run_folder(teachers: Path) -> None:
    m = manifest(teachers)
    assert m["stage"] == "train-teachers" and m["status"] == "complete"
    assert m["run_dir"] == str(teachers.resolve())
    assert m["seed"] == 0 and m["started"] < m["ended"]
    assert m["libraries"]["torch"] == metadata.version("torch")
    assert m["code_version"]
    assert m["dataset"]["name"] == "digits" and m["dataset"]["num_classes"] == 10
    metrics = m["metrics"]
    assert 0 <= metrics["test_errors"] <= m["dataset"]["sizes"]["test"]
    assert metrics["test_accuracy"] == 1 - metrics["test_errors"] / m["dataset"]["sizes"]["test"]
    assert set(metrics["ensemble"]) == {"arithmetic", "geometric"}
    assert [t["seed"] for t in metrics["members"]] == [0, 1]
    assert (teachers / ".hydra" / "config.yaml").is_file()
    records = [json.loads(line) for line in (teachers / "metrics.jsonl").read_text().splitlines()]
    assert [(r["model"], r["epoch"]) for r in records] == [
        ("teacher 0", 1),
        ("teacher 0", 2),
        ("teacher 1", 1),
        ("teacher 1", 2),
    ]
    logits = torch.load(teachers / "logits.pt", weights_only=True)
    sizes = m["dataset"]["sizes"]
    for split in ("train", "val", "test"):
        assert logits[split].shape == (2, sizes[split], 10)
    for i in range(2):
        assert "state_dict" in torch.load(teachers / f"member_{i}.pt", weights_only=True)


def test_distill_consumes_the_newest_complete_teachers_run(teachers: Path) -> None:
    root = teachers.parent.parent.parent  # the fixture's working directory
    # A newer unfinished run (no manifest) and a newer failed one: both must be skipped.
    (root / "outputs/train-teachers/9999-12-31_23-59-59-000000").mkdir()
    failed = root / "outputs/train-teachers/9999-12-31_23-59-59-000001"
    failed.mkdir()
    (failed / "manifest.json").write_text(
        json.dumps({"stage": "train-teachers", "status": "failed", "started": "9999"})
    )
    try:
        result = distillrun_here(root, "distill", "T=2", "alpha=0.5", *TINY_STUDENT)
    finally:
        (failed / "manifest.json").unlink()
        failed.rmdir()
        (root / "outputs/train-teachers/9999-12-31_23-59-59-000000").rmdir()
    out = result.stdout
    assert f"teachers {teachers.resolve()}" in out.replace("\n", "")
    assert "skipped 2 unfinished or failed train-teachers run(s)" in out
    for row in ("teacher 0", "teacher ensemble", "hard labels (alpha=0)", "distilled (T=2"):
        assert row in out
    (folder,) = runs(root, "distill")
    m = manifest(folder)
    assert m["stage"] == "distill" and m["status"] == "complete"
    assert m["inputs"] == {"teachers": str(teachers.resolve())}
    assert m["config"]["T"] == 2 and m["config"]["alpha"] == 0.5
    metrics = m["metrics"]
    for key in (
        "test_accuracy",
        "test_errors",
        "test_nll",
        "test_ece",
        "teacher_agreement",
        "baseline_test_errors",
        "teacher_test_errors",
        "student_params",
    ):
        assert key in metrics, key
    assert 0 <= metrics["teacher_agreement"] <= 1
    assert metrics["teacher_test_errors"] == manifest(teachers)["metrics"]["test_errors"]
    models = {json.loads(line)["model"] for line in (folder / "metrics.jsonl").open()}
    assert models == {"baseline", "student"}
    student = torch.load(folder / "student.pt", weights_only=True)
    assert student["num_classes"] == 10


def test_distill_sweep_writes_one_complete_run_per_job(teachers: Path, tmp_path: Path) -> None:
    distillrun_here(
        tmp_path,
        "distill",
        "-m",
        "alpha=0,0.7",
        f"teachers={teachers}",
        "baseline=false",
        *TINY_STUDENT,
    )
    (sweep,) = (tmp_path / "outputs/distill/multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    alphas = [manifest(j)["config"]["alpha"] for j in jobs]
    assert alphas == [0, 0.7]
    assert all(manifest(j)["status"] == "complete" for j in jobs)


def test_losses_and_ensembles_on_an_unlabeled_transfer_set(teachers: Path, tmp_path: Path) -> None:
    """Soft targets alone teach the student, and each loss and combination is really used."""
    distillrun_here(
        tmp_path,
        "distill",
        "-m",
        "loss=kd,logit_mse",
        "ensemble=arithmetic,geometric",
        f"teachers={teachers}",
        "transfer.labels=false",
        "transfer.fraction=0.5",
        "baseline=false",
        *LEARNING_STUDENT,
    )
    (sweep,) = (tmp_path / "outputs/distill/multirun").iterdir()
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 4
    weights = []
    for job in jobs:
        m = manifest(job)
        assert m["status"] == "complete"
        assert m["transfer_size"] == round(0.5 * m["dataset"]["sizes"]["train"])
        assert m["metrics"]["test_accuracy"] > 0.5  # chance is 0.1: the soft targets taught it
        weights.append(torch.load(job / "student.pt", weights_only=True)["state_dict"])
    # Same seed, init and batches: the students differ only if loss and ensemble took effect.
    for i in range(4):
        for j in range(i + 1, 4):
            assert any(not torch.equal(weights[i][k], weights[j][k]) for k in weights[i])


def test_glob_sweeps_are_left_to_hydra(tmp_path: Path) -> None:
    distillrun_here(
        tmp_path,
        "train-teachers",
        "-m",
        "model=glob(mlp_s*)",
        "teachers.n=1",
        "train.epochs=1",
        "progress=false",
    )
    (job,) = (tmp_path / "outputs/train-teachers/multirun").glob("*/0")
    assert manifest(job)["config"]["model"]["hidden"] == [64]  # mlp_student


def test_omitted_class_with_a_fitted_bias(teachers: Path, tmp_path: Path) -> None:
    distillrun_here(
        tmp_path,
        "distill",
        f"teachers={teachers}",
        "transfer.omit_classes=[3]",
        "transfer.fit_omit_bias=true",
        "baseline=false",
        *LEARNING_STUDENT,
    )
    (folder,) = runs(tmp_path, "distill")
    metrics = manifest(folder)["metrics"]
    # Never trained to say 3, the student misses 3s; the bias fitted on validation brings them
    # back (raising class 3's bias can only turn more predictions into 3s).
    assert metrics["omit_bias"] > 0
    assert metrics["test_errors_on_omitted"] < metrics["uncorrected_test_errors_on_omitted"]


def test_concurrent_runs_get_distinct_folders(tmp_path: Path) -> None:
    args = [DISTILLRUN, "train-teachers", "teachers.n=1", "train.epochs=1", "progress=false"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    folders = runs(tmp_path, "train-teachers")
    assert len(folders) == 2
    assert all(manifest(f)["status"] == "complete" for f in folders)


# --- bad input: one line, exit 2, nothing written ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["distill", "dataset=digitz"], ["unknown dataset 'digitz'", "did you mean 'digits'"]),
        (["train-teachers", "model=mpl"], ["unknown model 'mpl'", "did you mean 'mlp'"]),
        (["distill", "optim=adamw"], ["unknown optim 'adamw'", "adam, sgd"]),
        (["distill", "T=0"], ["T=0", "> 0"]),
        (["distill", "T=-3"], ["T=-3", "> 0"]),
        (["distill", "T=hot"], ["T=hot"]),
        (["distill", "alpha=1.5"], ["alpha=1.5", "[0, 1]"]),
        (["distill", "alpha=-0.1"], ["alpha=-0.1"]),
        (["distill", "T=0", "alpha=2"], ["T=0", "alpha=2", "2 problems"]),
        (["distill", "-m", "T=1,0"], ["T=0"]),
        (["distill", "alpha=0.5", "-m", "T=1,0"], ["T=0"]),  # -m amid the overrides
        (["distill", "foo=1"], ["foo", "--cfg job"]),
        (["distill", "+alpah=0.5"], ["+alpah=0.5", "no stage reads", "did you mean alpha=0.5"]),
        (["distill", "transfer.fraction=0"], ["transfer.fraction=0", "(0, 1]"]),
        (["distill", "transfer.omit_classes=3"], ["omit_classes", "[3]"]),
        (["distill", "ensemble=harmonic"], ["ensemble=harmonic", "arithmetic or geometric"]),
        (["distill", "loss=l2"], ["unknown loss 'l2'", "dist, dkd, kd, logit_mse, nkd"]),
        (["train-teachers", "teachers.n=0"], ["teachers.n=0", ">= 1"]),
        (["train-teachers", "train.epochs=0"], ["train.epochs=0", ">= 1"]),
        (["train-teachers", "optim.lr=-1"], ["optim.lr=-1", "> 0"]),
        (["train-teachers", "model.dropout=1.2"], ["model.dropout=1.2", "[0, 1)"]),
        (["train-teachers", "dataset=npz"], ["dataset.path="]),
        (["train-teachers", "device=tpu"], ["device=tpu"]),
        (["train-teachers", "model.hidden=64"], ["model.hidden=64", "e.g. [64]"]),
        (["train-teachers", "model=cnn", "model.channels=5"], ["model.channels=5"]),
        (["train-teachers", "optim.betas=5"], ["optim.betas=5"]),
        (
            ["train-teachers", "optim=sgd", "optim.nesterov=true", "optim.momentum=0"],
            ["nesterov=true needs optim.momentum > 0"],
        ),
        (["train-teachers", "seed=99999999999999999999"], ["seed=99999999999999999999"]),
        (["train-teachers", "dataset.split_seed=-1"], ["dataset.split_seed=-1"]),
        (["distill", "T=inf"], ["T=inf", "finite"]),
        (["distill", "paths.output_root=/proc/nope"], ["paths.output_root=/proc/nope"]),
        (["distill", "--cfg", "job", "foo=1"], ["foo"]),
        (["distill", "-m", "T=1,2", "--cfg", "job"], ["drop -m"]),
    ],
)
def test_bad_values_are_refused_before_any_run_folder(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    assert_one_line_error(distillrun_here(tmp_path, *args, check=None), *fragments)
    assert not (tmp_path / "outputs").exists()


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = distillrun(tmp_path, "distill", "T=0", env={"HYDRA_FULL_ERROR": "1"}, check=None)
    assert result.returncode != 0 and "Traceback" in result.stderr and "T=0" in result.stderr


def missing_teachers(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    return ["teachers=/no/such/run"], ["/no/such/run does not exist"]


def unfinished_teachers(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    (tmp_path / "half").mkdir()
    return [f"teachers={tmp_path / 'half'}"], ["not a finished run", "interrupted"]


def wrong_stage(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"stage": "distill", "status": "complete"}')
    return [f"teachers={folder}"], ["is a distill run, not a train-teachers run"]


def corrupt_manifest(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"stage": "train-tea')
    return [f"teachers={folder}"], ["corrupt manifest"]


def no_teachers_at_all(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    return [], ["no complete train-teachers run", "run `distillrun train-teachers` first"]


def other_splits(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    return [f"teachers={teachers}", "dataset.split_seed=7"], ["the dataset fingerprint differs"]


def class_out_of_range(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    return [f"teachers={teachers}", "transfer.omit_classes=[12]"], ["[12] out of range", "0..9"]


def no_cuda(tmp_path: Path, teachers: Path) -> tuple[list[str], list[str]]:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return [f"teachers={teachers}", "device=cuda"], ["CUDA is not available", "device=auto"]


@pytest.mark.parametrize(
    "case",
    [
        missing_teachers,
        unfinished_teachers,
        wrong_stage,
        corrupt_manifest,
        no_teachers_at_all,
        other_splits,
        class_out_of_range,
        no_cuda,
    ],
)
def test_bad_teachers_and_data_are_one_line_errors(case, teachers: Path, tmp_path: Path) -> None:
    args, fragments = case(tmp_path, teachers)
    before = sorted(p.name for p in teachers.iterdir())
    result = distillrun_here(tmp_path, "distill", *args, *TINY_STUDENT, check=None)
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in teachers.iterdir()) == before  # the input is left alone
    (folder,) = runs(tmp_path, "distill")
    assert manifest(folder)["status"] == "failed"  # never mistaken for a complete run


def test_a_sweep_over_added_groups_and_keys_is_checked_value_by_value() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from distillrun.cli import _combinations

    parsed = OverridesParser.create().parse_overrides(
        ["+experiment=a,b", "++T=2,4", "~alpha", "seed=1"]
    )
    assert _combinations(parsed) == [
        ["~alpha", "seed=1", "+experiment=a", "++T=2"],
        ["~alpha", "seed=1", "+experiment=b", "++T=2"],
        ["~alpha", "seed=1", "+experiment=a", "++T=4"],
    ]


def test_a_key_that_only_the_swept_presets_add_can_be_set(tmp_path: Path) -> None:
    from distillrun.cli import precheck

    # Hydra composes a sweep's base config without the swept presets, where the default
    # dataset (digits) has no `root`: the key is forced there, as it is valid in every job.
    sweep = ["-m", "experiment=mnist_cnn_teachers,hinton_mnist_teachers"]
    missing = tmp_path / "no-mnist-here"
    assert precheck("train-teachers", [*sweep, f"dataset.root={missing}", "seed=3"]) == [
        *sweep,
        f"++dataset.root={missing}",
        "seed=3",
    ]
    typed = ["-m", "+experiment=mnist_cnn_teachers,hinton_mnist_teachers"]  # as users type it
    result = distillrun_here(tmp_path, "train-teachers", *typed, f"dataset.root={missing}", check=2)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3, result.stderr  # each job reached its data, and the sweep's line
    assert all(f"MNIST not found under {missing}" in line for line in errors[:2])
    assert "2 of 2 jobs did not complete" in errors[2]
    # A misspelled key is still refused before anything is written, forced or not.
    typo = distillrun_here(tmp_path, "train-teachers", *sweep, f"dataset.rot={missing}", check=None)
    assert_one_line_error(typo, "dataset.rot")
    assert len(list((tmp_path / "outputs" / "train-teachers" / "multirun").iterdir())) == 1
