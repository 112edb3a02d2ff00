"""Reliability through the real command: killed and interrupted runs, resume, safe loading,
numerical and environment trouble. Each case checks what the user sees: one line, an exit code,
and a run folder that never looks complete when it is not."""

from __future__ import annotations

import csv
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DISTILLRUN,
    ONE_THREAD,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
    metric_lines,
    runs,
    signal_when,
    start,
    without_timings,
)
from omegaconf import OmegaConf

from distillrun.cli import _compose
from distillrun.core.models import build_model
from distillrun.core.train import TrainSettings, divergence, fit
from distillrun.errors import Terminated, UserError, raise_terminated
from distillrun.method.augment import Views
from distillrun.runs import artifacts
from distillrun.stages import common
from distillrun.stages.common import TEST_KILL_ENV, as_today

# Small enough for seconds, long enough to be killed in the middle of the second teacher; a
# resumable checkpoint after every epoch, so that a kill lands between two of them.
EVERY_EPOCH = "train.checkpoint_every=0"
TEACHERS = [
    "teachers.n=2",
    "train.epochs=12",
    "train.batch_size=16",
    "model.hidden=[32]",
    "progress=false",
    EVERY_EPOCH,
]
STUDENT = [
    "train.epochs=12",
    "train.batch_size=16",
    "model.hidden=[16]",
    "progress=false",
    EVERY_EPOCH,
]


def cli(cwd: Path, *args: str, check: int | None = 0):
    """The installed command in a subprocess: for kills, signals and resumes after them."""
    return distillrun(cwd, *args, env=ONE_THREAD, check=check)


def here(cwd: Path, *args: str, check: int | None = 0):
    """The command in this process (conftest.distillrun_here), with one thread as `cli`."""
    return distillrun_here(cwd, *args, env=ONE_THREAD, check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted teachers run: the numbers a killed-and-resumed run must reach."""
    cwd = tmp_path_factory.mktemp("reference")
    here(cwd, "train-teachers", *TEACHERS)
    (folder,) = runs(cwd, "train-teachers")
    return folder


def copy_run(folder: Path, cwd: Path, name: str = "2026-01-01_00-00-00-000000") -> Path:
    target = cwd / "outputs" / "train-teachers" / name
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def distill_reference(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted distill run (baseline, then student) on the reference teachers."""
    cwd = tmp_path_factory.mktemp("distill-reference")
    copy_run(reference, cwd)
    here(cwd, "distill", *STUDENT)
    (folder,) = runs(cwd, "distill")
    return folder


# The default checkpoint cadence (60 s): no checkpoint before a model's last epoch, unless a
# signal asks for one, so a kill lands before a model's first checkpoint.
DEFAULT_CADENCE_TEACHERS = [a for a in TEACHERS if a != EVERY_EPOCH]
DEFAULT_CADENCE_STUDENT = [a for a in STUDENT if a != EVERY_EPOCH]


def killed_at(cwd: Path, point: str, *args: str, code: int = -signal.SIGKILL):
    """The command, stopped at `point` ("<model>:<epoch>[:<signal>]", see
    stages.common._test_kill_point), with SIGHUP as at a terminal (not as under nohup)."""
    result = subprocess.run(
        [DISTILLRUN, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **ONE_THREAD, TEST_KILL_ENV: point},
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    assert result.returncode == code, result.stdout + result.stderr
    return result


def assert_a_prefix_of(folder: Path, reference: Path) -> None:
    """After a kill, metrics.jsonl holds the uninterrupted run's first lines, none twice."""
    lines, whole = metric_lines(folder), metric_lines(reference)
    assert lines and lines == whole[: len(lines)], [(r.get("model"), r["epoch"]) for r in lines]


# --- kill, resume, determinism ------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_is_never_consumed_and_resumes_to_the_same_numbers(
    reference: Path, tmp_path: Path
) -> None:
    proc = start(tmp_path, "train-teachers", *TEACHERS)
    signal_when(proc, "outputs/train-teachers/*/resume/teacher_1.pt", tmp_path, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (killed,) = runs(tmp_path, "train-teachers")
    assert manifest(killed)["status"] == "running"  # never "complete"
    assert not (killed / "logits.pt").exists()

    consumer = cli(tmp_path, "distill", *STUDENT, check=None)
    assert_one_line_error(consumer, "no complete train-teachers run")
    assert "skipped 1 unfinished or failed train-teachers run" in consumer.stdout
    assert "resume=" in consumer.stdout

    cli(tmp_path, "train-teachers", f"resume={killed}")
    resumed = manifest(killed)
    assert resumed["status"] == "complete" and len(resumed["resumed"]) == 1
    assert without_timings(resumed["metrics"]) == without_timings(manifest(reference)["metrics"])
    assert metric_lines(killed) == metric_lines(reference)
    assert not (killed / "resume").exists()  # resumable checkpoints go once a run is complete
    for name in ("logits.pt", "member_0.pt", "member_1.pt"):
        assert (killed / name).read_bytes() == (reference / name).read_bytes()


@pytest.mark.slow
def test_metrics_lines_are_exact_after_a_kill_at_any_moment(
    reference: Path, tmp_path: Path
) -> None:
    """Killed before the first model's first checkpoint, between two models, stopped by a
    closed terminal (SIGHUP: a checkpoint) while `| head -1` has left, killed past that
    checkpoint, then resumed to the end, its output closed again: no run is lost, and every
    resume leaves each model's lines exactly its checkpointed epochs."""
    killed_at(tmp_path, "teacher 0:5", "train-teachers", *DEFAULT_CADENCE_TEACHERS)
    (folder,) = runs(tmp_path, "train-teachers")
    assert not (folder / "resume").exists()  # no checkpoint yet, 5 lines
    assert manifest(folder)["status"] == "running"
    assert artifacts.reported_status(folder, manifest(folder)) == "interrupted"  # nobody runs it
    resume = ("train-teachers", f"resume={folder}")

    killed_at(tmp_path, "teacher 1:0", *resume)  # teacher 0 done, teacher 1 not begun
    assert_a_prefix_of(folder, reference)
    hangup = start_and_close_output(tmp_path, *resume, env={TEST_KILL_ENV: "teacher 1:4:HUP"})
    assert hangup.wait(timeout=300) == 128 + signal.SIGHUP
    m = manifest(folder)
    assert m["status"] == "interrupted" and "SIGHUP" in m["error"]
    assert m["resume_command"] == f"distillrun train-teachers resume={folder.resolve()}"
    assert_a_prefix_of(folder, reference)
    killed_at(tmp_path, "teacher 1:8", *resume)  # four lines past the checkpoint of epoch 4
    assert_a_prefix_of(folder, reference)

    assert start_and_close_output(tmp_path, *resume).wait(timeout=300) == 0
    assert metric_lines(folder) == metric_lines(reference)
    done = manifest(folder)
    assert without_timings(done["metrics"]) == without_timings(manifest(reference)["metrics"])
    assert done["status"] == "complete" and "resume_command" not in done
    for name in ("logits.pt", "member_0.pt", "member_1.pt"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes()


@pytest.mark.parametrize("point", ["teacher 0:2", "teacher 1:12"])  # mid-run; after the last line
def test_a_folder_deleted_under_a_running_stage_is_one_line_and_stays_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    def delete_at(label: str, epoch: int) -> None:
        if f"{label}:{epoch}" == point:
            shutil.rmtree(runs(tmp_path, "train-teachers")[0])

    monkeypatch.setattr(common, "_test_kill_point", delete_at)
    result = here(tmp_path, "train-teachers", *TEACHERS, check=None)
    assert_one_line_error(result, "was deleted while the run was writing it")
    assert runs(tmp_path, "train-teachers") == []  # not made anew with a part of the files


def start_and_close_output(cwd: Path, *args: str, env: dict[str, str] | None = None):
    """The command with its reader gone after one line, as in `distillrun ... | head -1`."""
    proc = start(cwd, *args, env=env)
    assert proc.stdout.readline()  # what `head -1` reads before it leaves
    proc.stdout.close()
    proc.stderr.close()
    return proc


@pytest.mark.slow
def test_distill_metrics_lines_are_exact_after_kills_in_either_model(
    reference: Path, distill_reference: Path, tmp_path: Path
) -> None:
    copy_run(reference, tmp_path)
    # After the baseline's last line, before its (final) checkpoint; then in the student.
    killed_at(tmp_path, "baseline:12", "distill", *DEFAULT_CADENCE_STUDENT)
    (folder,) = runs(tmp_path, "distill")
    assert not (folder / "resume").exists()
    killed_at(tmp_path, "student:4", "distill", f"resume={folder}")
    assert_a_prefix_of(folder, distill_reference)
    cli(tmp_path, "distill", f"resume={folder}")
    assert metric_lines(folder) == metric_lines(distill_reference)
    assert without_timings(manifest(folder)["metrics"]) == without_timings(
        manifest(distill_reference)["metrics"]
    )


@pytest.mark.slow
def test_the_manifest_records_how_to_repeat_the_run(reference: Path) -> None:
    m = manifest(reference)
    assert m["command"] == shlex.join(["distillrun", "train-teachers", *TEACHERS])
    assert m["overrides"] == TEACHERS and m["seed"] == 0 and m["device"] == "cpu"
    assert m["determinism"]["deterministic_algorithms"] is True
    assert m["determinism"]["torch_threads"] == m["environment"]["torch_threads"] >= 1
    assert "+" in m["code_version"]  # the git commit (with -dirty for local changes)
    assert {"python", "torch", "numpy", "hydra-core"} <= set(m["libraries"])


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted_and_resume_keeps_its_teachers(
    reference: Path, distill_reference: Path, tmp_path: Path
) -> None:
    teachers = copy_run(reference, tmp_path)
    whole = distill_reference

    proc = start(tmp_path, "distill", *STUDENT)
    signal_when(proc, "outputs/distill/*/resume/student.pt", tmp_path, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    (folder,) = runs(tmp_path, "distill")
    assert err.strip() == (
        f"distillrun distill: interrupted; continue this run with "
        f"`distillrun distill resume={folder.resolve()}`"
    )
    assert manifest(folder)["status"] == "interrupted"

    # A newer complete teachers run appears meanwhile: the resumed run keeps the one it began with.
    newer = copy_run(reference, tmp_path, "2099-01-01_00-00-00-000000")
    newer_manifest = manifest(newer)
    newer_manifest["started"] = "2099"
    (newer / "manifest.json").write_text(json.dumps(newer_manifest))
    cli(tmp_path, "distill", f"resume={folder}")
    m = manifest(folder)
    assert m["status"] == "complete" and m["inputs"] == {"teachers": str(teachers.resolve())}
    assert without_timings(m["metrics"]) == without_timings(manifest(whole)["metrics"])
    assert metric_lines(folder) == metric_lines(whole)


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_continue(reference: Path, tmp_path: Path) -> None:
    done = here(tmp_path, "train-teachers", f"resume={reference}")
    assert "already complete; nothing to resume" in done.stdout

    interrupted = copy_run(reference, tmp_path)
    m = manifest(interrupted)
    (interrupted / "manifest.json").write_text(json.dumps({**m, "status": "interrupted"}))
    before = (interrupted / "manifest.json").read_text()
    cases = [
        (["train-teachers", f"resume={interrupted}", "teachers.n=3"], ["drop teachers.n=3"]),
        (["train-teachers", f"resume={interrupted}", "-m"], ["drop -m"]),
        (["distill", f"resume={interrupted}"], ["is a train-teachers run"]),
        (["train-teachers", f"resume={tmp_path / 'nope'}"], ["does not exist"]),
        (["train-teachers", f"resume={tmp_path}"], ["not a run folder"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(here(tmp_path, *args, check=None), *fragments)
    assert (interrupted / "manifest.json").read_text() == before  # left as it was

    # Same overrides, but the defaults changed since the run began: not the same run any more.
    m["config"]["train"]["eval_batch_size"] = 999
    (interrupted / "manifest.json").write_text(json.dumps({**m, "status": "interrupted"}))
    before = (interrupted / "manifest.json").read_text()
    result = here(tmp_path, "train-teachers", f"resume={interrupted}", check=None)
    assert_one_line_error(result, "another config (train.eval_batch_size differ")
    assert (interrupted / "manifest.json").read_text() == before


def test_a_config_recorded_before_keys_were_added_reads_as_today() -> None:
    today = OmegaConf.to_container(_compose("distill", ["dataset=mnist"]))
    older = json.loads(json.dumps(today))
    del older["train"]["max_batches_per_epoch"], older["dataset"]["max_per_split"]
    older["loss"] = "kd"  # before loss= was a group
    assert older != today and as_today(older) == today
    older["dataset"]["val_fraction"] = 0.2  # a real change still shows
    assert as_today(older) != today


# --- safe loading -------------------------------------------------------------------------------


class CreatesAFile:
    """Unpickling this would create `path`: proof that a loader ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def truncated(logits: Path, tmp_path: Path) -> str:
    logits.write_bytes(logits.read_bytes()[:500])
    return "empty or truncated"


def random_bytes(logits: Path, tmp_path: Path) -> str:
    logits.write_bytes(random.Random(0).randbytes(4096))  # the same bytes every run
    return "not a tensor checkpoint"


def pickle_with_code(logits: Path, tmp_path: Path) -> str:
    torch.save({"train": CreatesAFile(tmp_path / "pwned")}, logits)
    return "refused"


def other_class_count(logits: Path, tmp_path: Path) -> str:
    cache = torch.load(logits, weights_only=True)
    artifacts.save_tensors(logits, {**cache, **{s: cache[s][..., :5] for s in ("train", "test")}})
    return "does not hold teacher logits for this dataset"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncated, random_bytes, pickle_with_code])
def test_each_kind_of_bad_file_gets_its_own_reason(damage, reference: Path, tmp_path: Path) -> None:
    path = tmp_path / "logits.pt"
    shutil.copy(reference / "logits.pt", path)
    fragment = damage(path, tmp_path)
    with pytest.raises(UserError) as err:
        artifacts.load_tensors(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and fragment in message
    assert "nothing in it was run" in message and "weights_only" not in message
    assert not (tmp_path / "pwned").exists()


def test_a_stale_running_manifest_reads_as_interrupted(tmp_path: Path) -> None:
    """A manifest saying "running" whose folder lock nobody holds: its process died."""
    from distillrun.runs.summary import _row

    folder = tmp_path / "outputs" / "train-teachers" / "run"
    folder.mkdir(parents=True)
    artifacts.write_manifest(folder, stage="train-teachers", status="running")
    artifacts.lock_run_folder(folder).close()  # a lock file, released: as a killed run leaves
    with pytest.raises(UserError, match=f"status interrupted: .*resume={folder}"):
        artifacts.complete_run(folder, "train-teachers")
    said: list[str] = []
    with pytest.raises(UserError, match="no complete train-teachers run"):
        artifacts.newest_complete_run(
            tmp_path / "outputs", "train-teachers", lambda m: None, said.append
        )
    assert "(1 interrupted)" in said[0]
    assert _row("run", folder).status == "interrupted"

    held = artifacts.lock_run_folder(folder)  # the run's process is alive: it is running
    try:
        with pytest.raises(UserError, match="still running .*wait for it"):
            artifacts.complete_run(folder, "train-teachers")
        assert _row("run", folder).status == "running"
    finally:
        held.close()


# Through the command: the cache a distill run reads (the other kinds are covered just above).
@pytest.mark.slow
@pytest.mark.parametrize("damage", [pickle_with_code, other_class_count])
def test_bad_teacher_caches_are_one_line_errors_and_run_nothing(
    damage, reference: Path, tmp_path: Path
) -> None:
    teachers = copy_run(reference, tmp_path)
    fragment = damage(teachers / "logits.pt", tmp_path)
    result = here(tmp_path, "distill", *STUDENT, check=None)
    assert_one_line_error(result, str(teachers / "logits.pt"), fragment)
    assert not (tmp_path / "pwned").exists()
    (folder,) = runs(tmp_path, "distill")
    assert manifest(folder)["status"] == "failed"


@pytest.mark.slow
def test_a_resumable_checkpoint_of_another_architecture_is_refused(
    reference: Path, tmp_path: Path
) -> None:
    run = copy_run(reference, tmp_path)
    (run / "manifest.json").write_text(json.dumps({**manifest(run), "status": "interrupted"}))
    other = build_model({"name": "mlp", "hidden": [16]}, (1, 8, 8), 10)
    x = torch.randn(40, 1, 8, 8)
    y = torch.randint(0, 10, (40,))
    fit_resumable(other, x, y, run / "resume" / "teacher_0.pt", epochs=12)
    result = here(tmp_path, "train-teachers", f"resume={run}", check=None)
    assert_one_line_error(
        result, "teacher 0: resumable checkpoint", "another architecture or class count"
    )
    assert manifest(run)["status"] == "failed"


# --- numerical and environment trouble ----------------------------------------------------------


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_epoch_and_the_fix(tmp_path: Path) -> None:
    args = ["optim=sgd", "optim.lr=1e30", "optim.momentum=0", *TEACHERS]
    result = here(tmp_path, "train-teachers", *args, check=None)
    assert_one_line_error(result, "teacher 0", "became nan in epoch 1", "lower optim.lr")
    (folder,) = runs(tmp_path, "train-teachers")
    assert manifest(folder)["status"] == "failed"


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_resumable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write there: no space left
    result = here(tmp_path, "train-teachers", *TEACHERS, f"hydra.run.dir={run}", check=None)
    assert_one_line_error(result, "no space left", "free some disk space", f"resume={run}")
    assert manifest(run)["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["hydra.run.dir=/proc/nope/run"], ["hydra.run.dir=/proc/nope/run cannot be written"]),
        (["-m", "hydra.sweep.dir=/proc/nope", "seed=0,1"], ["hydra.sweep.dir=/proc/nope"]),
        (["dataset=mnist", "dataset.root=/no/such/root"], ["MNIST not found under /no/such/root"]),
        (
            [
                "optim.gamma=0",
                "optim.step_size=0",
                "model.name=foo",
                "dataset=mnist",
                "dataset.download=maybe",
            ],
            ["optim.gamma=0", "optim.step_size=0", "model.name=foo", "4 problems"],
        ),
        (["dataset=mnist1d", "dataset.num_samples=3"], ["dataset.num_samples=3"]),
    ],
)
def test_environment_and_config_trouble_is_one_line(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    assert_one_line_error(
        here(tmp_path, "train-teachers", *args, *TEACHERS, check=None), *fragments
    )


@pytest.mark.slow
def test_an_npz_of_random_bytes_is_not_unpickled(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(os.urandom(500))
    args = ["dataset=npz", f"dataset.path={tmp_path / 'bad.npz'}", *TEACHERS]
    result = here(tmp_path, "train-teachers", *args, check=None)
    assert_one_line_error(result, "not a readable .npz file", "was not loaded")
    assert "allow_pickle" not in result.stderr


@pytest.mark.slow
def test_a_dataset_root_with_the_wrong_files_is_one_line(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(os.urandom(256))
    args = ["dataset=mnist", f"dataset.root={tmp_path / 'data'}", *TEACHERS]
    result = here(tmp_path, "train-teachers", *args, check=None)
    assert_one_line_error(result, "MNIST", "dataset.root=")


# --- the training loop's resumable checkpoints, in process -------------------------------------

OPTIM = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.0}


def fit_resumable(
    model, x, y, state_path, epochs, resume=False, on_epoch=lambda r: None, checkpoint_every=0
):
    settings = TrainSettings(
        {**OPTIM, "schedule": "cosine"},
        epochs=epochs,
        batch_size=8,
        seed=3,
        augment=Views(1, False, "replicate") if x.dim() == 4 else None,
        checkpoint_every=checkpoint_every,
    )
    return fit(
        model,
        x,
        lambda out, b: F.cross_entropy(out, y[b.idx]),
        settings,
        x_val=x[:10],
        y_val=y[:10],
        state_path=state_path,
        resume=resume,
        on_epoch=on_epoch,
    )


def test_fit_resumes_bit_identically_with_dropout_and_shifted_views(tmp_path: Path) -> None:
    cfg = {"name": "cnn", "channels": [4], "hidden": 16, "dropout": 0.5}
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    whole = fit_resumable(build_model(cfg, (1, 8, 8), 3), x, y, tmp_path / "a.pt", epochs=4)

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit_resumable(
            build_model(cfg, (1, 8, 8), 3), x, y, tmp_path / "b.pt", 4, False, stop_after_two
        )
    torch.manual_seed(0)
    resumed = fit_resumable(build_model(cfg, (1, 8, 8), 3), x, y, tmp_path / "b.pt", 4, True)
    assert resumed.best_epoch == whole.best_epoch
    assert without_timings(resumed.history) == without_timings(whole.history)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # The finished checkpoint is small (the selected model only) and loads back as it is.
    finished = torch.load(tmp_path / "b.pt", weights_only=True)
    assert finished["finished"] and finished["optimizer"] is None
    torch.manual_seed(0)
    again = fit_resumable(build_model(cfg, (1, 8, 8), 3), x, y, tmp_path / "b.pt", 4, True)
    assert again.history == resumed.history


def test_a_nan_loss_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    x = torch.randn(32, 4)
    calls = []

    def loss_fn(out, batch):
        calls.append(1)
        loss = out.logsumexp(1).mean()
        return loss * float("nan") if len(calls) > 8 else loss  # 4 batches an epoch: epoch 3

    model = build_model({"name": "mlp", "hidden": [8]}, (4,), 3)
    with pytest.raises(UserError, match="became nan in epoch 3.*epoch 2 is kept.*optim.lr"):
        fit(
            model,
            x,
            loss_fn,
            TrainSettings({**OPTIM, "schedule": "constant"}, 5, 8, checkpoint_every=0),
            x_val=x[:0],
            y_val=torch.zeros(0, dtype=torch.long),
            state_path=tmp_path / "s.pt",
        )
    assert torch.load(tmp_path / "s.pt", weights_only=True)["epoch"] == 2


def test_a_resumed_run_keeps_only_the_lines_its_checkpoints_hold(tmp_path: Path) -> None:
    """Lines of a model with no checkpoint (killed before its first one) and of no model
    (evaluate's, computed afresh) go; `restore_log` then trims the others to their
    checkpoints."""
    from distillrun.stages.common import Run

    run = Run("train-teachers", tmp_path, torch.device("cpu"), resuming=True)
    lines = [
        {"model": "teacher 0", "epoch": 1},
        {"model": "teacher 0", "epoch": 2},
        {"model": "teacher 1", "epoch": 1},
        {"split": "val", "examples": 10},
    ]
    artifacts.write_jsonl(tmp_path / "metrics.jsonl", lines)
    artifacts.save_tensors(run.state_path("teacher 0"), {"epoch": 1})
    run.drop_lines_to_redo()
    assert artifacts.read_jsonl(tmp_path / "metrics.jsonl") == lines[:2]


def test_environment_errors_become_one_line_messages(tmp_path: Path) -> None:
    import errno

    from distillrun.stages.common import Run, _user_message

    run = Run("distill", tmp_path, torch.device("cpu"))
    full = _user_message(run, OSError(errno.ENOSPC, "No space left on device", "x.pt"))
    assert full.startswith("no space left writing x.pt") and "resume=" in full
    denied = _user_message(run, OSError(errno.EACCES, "Permission denied", "y.pt"))
    assert "cannot write y.pt (Permission denied)" in denied and "paths.output_root" in denied
    assert _user_message(run, OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug


def test_a_nearly_full_disk_is_refused_before_hydra_writes(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    from distillrun import cli
    from distillrun.errors import UserError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(UserError, match="only 1 MB free under paths.output_root"):
        cli._check_output_root(str(tmp_path))


# --- checkpoint cadence, SIGTERM, divergence, the folder lock -------------------------------


def test_sigterm_finishes_the_epoch_and_writes_its_checkpoint_whatever_the_cadence(
    tmp_path: Path,
) -> None:
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(1))
    cfg = {"name": "mlp", "hidden": [8], "dropout": 0.3}

    def run(path: Path, resume: bool = False, on_epoch=lambda r: None):
        torch.manual_seed(0)
        model = build_model(cfg, (6,), 3)
        # 60 s, the default: never within these short epochs
        return fit_resumable(model, x, y, path, 5, resume, on_epoch, checkpoint_every=60)

    whole = run(tmp_path / "whole.pt")

    def ctrl_c_at_3(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c.pt", on_epoch=ctrl_c_at_3)
    assert not (tmp_path / "c.pt").exists()  # within the cadence: nothing written mid-run

    def sigterm_at_2(record):
        if record["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, raise_terminated)  # as in a stage
    try:
        with pytest.raises(Terminated):
            run(tmp_path / "t.pt", on_epoch=sigterm_at_2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    saved = torch.load(tmp_path / "t.pt", weights_only=True)
    assert saved["epoch"] == 2 and not saved["finished"]
    resumed = run(tmp_path / "t.pt", resume=True)
    assert without_timings(resumed.history) == without_timings(whole.history)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_divergence_is_told_from_the_history() -> None:
    def history(losses, accuracies):
        return [
            {"train_loss": loss, "val_accuracy": acc}
            for loss, acc in zip(losses, accuracies, strict=True)
        ]

    assert "ended at 5e+10" in divergence(history([1e26, 5e10], [0.1, 0.1]), 2.3, 0.1)
    stuck = divergence(history([2.3, 2.3], [0.1, 0.11]), 2.3, 0.1)
    assert "stayed at chance" in stuck and "0.110" in stuck
    assert divergence(history([2.0, 1.2], [0.1, 0.11]), 2.3, 0.1) is None  # learning, slowly
    assert divergence(history([1.0, 0.5], [0.6, 0.9]), 2.3, 0.1) is None
    assert divergence([], 2.3, 0.1) is None


def test_the_folder_lock_admits_one_process(tmp_path: Path) -> None:
    held = artifacts.lock_run_folder(tmp_path)
    assert artifacts.is_locked(tmp_path)
    with pytest.raises(UserError, match="in use by another distillrun process"):
        artifacts.lock_run_folder(tmp_path)
    held.close()  # what the OS does when the process dies, however it dies
    assert not artifacts.is_locked(tmp_path)
    artifacts.lock_run_folder(tmp_path).close()
    assert not artifacts.is_locked(tmp_path / "nothing")


@pytest.mark.slow
def test_a_running_folder_is_refused_to_a_second_process(reference: Path, tmp_path: Path) -> None:
    proc = start(tmp_path, "train-teachers", *TEACHERS)
    # Paused once under way, so that it is still running (holding its folder) whatever the load
    signal_when(proc, "outputs/train-teachers/*/resume/teacher_0.pt", tmp_path, signal.SIGSTOP)
    try:
        (folder,) = runs(tmp_path, "train-teachers")
        hydra_files = {p.name: p.read_bytes() for p in (folder / ".hydra").iterdir()}
        second = cli(tmp_path, "train-teachers", f"resume={folder}", check=None)
        assert_one_line_error(second, f"resume={folder.resolve()} is still running")
        same_dir = cli(tmp_path, "train-teachers", *TEACHERS, f"hydra.run.dir={folder}", check=None)
        assert_one_line_error(same_dir, "is in use by another distillrun process")
        assert {p.name: p.read_bytes() for p in (folder / ".hydra").iterdir()} == hydra_files
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=240) == 0  # the first run, undisturbed
    assert without_timings(manifest(folder)["metrics"]) == without_timings(
        manifest(reference)["metrics"]
    )


@pytest.mark.slow
def test_a_diverging_run_completes_with_a_warning_and_the_flag(
    reference: Path, tmp_path: Path
) -> None:
    teachers = copy_run(reference, tmp_path)
    student = ["train.epochs=12", "train.batch_size=16", "model.hidden=[16]", "progress=false"]
    args = ["-m", "optim.lr=0.001,1e12", "baseline=false", f"teachers={teachers}", *student]
    result = here(tmp_path, "distill", *args)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert (
        warnings == [warnings[0]]
        and "distillrun distill: warning: student looks diverged: the training loss ended at"
        in (warnings[0])
    )
    assert "lower optim.lr (now 1e+12)" in warnings[0]
    sweep = next((tmp_path / "outputs/distill/multirun").iterdir())
    fine, diverged = (manifest(sweep / job) for job in ("0", "1"))
    assert fine["status"] == diverged["status"] == "complete"
    assert "diverged" not in fine["metrics"] and diverged["metrics"]["diverged"] is True
    assert "up from" in diverged["diverged_models"]["student"]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["diverged"] for r in rows] == ["", "1"]  # jobs 0 and 1
