"""Smoke runs in seconds on big data, and what a stage spends outside training (issue 26).

debug=tiny's cap on the batches of an epoch (train.max_batches_per_epoch), which leaves every
run without it as it was, its subset of each split (dataset.max_per_split) and its place after
an experiment preset; the teachers' inference speed, timed once by the run that makes them
and reused by distill on the same machine; the MNIST loader's values; distill's table and the
manifest's command line; freed memory kept for reuse (core/memory.py).
"""

from __future__ import annotations

import io
import platform
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    ONE_THREAD,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
    runs,
    write_idx,
)
from omegaconf import OmegaConf
from rich.console import Console

from distillrun import console
from distillrun.cli import _compose, preset_as_choice, resume_args
from distillrun.config import validate
from distillrun.core import inference_speed
from distillrun.core.data import Data, _finish, load_dataset
from distillrun.core.inference_speed import machine, recorded_speed
from distillrun.core.models import build_model, checkpoint
from distillrun.core.train import TrainSettings, fit, make_deterministic
from distillrun.errors import UserError
from distillrun.runs.artifacts import save_tensors
from distillrun.runs.teacher_runs import check_data
from distillrun.stages.common import Run
from distillrun.stages.distill import inference_cost
from distillrun.stages.train_teachers import hard_label_loss, member_models, record_inference_speed

CPU = torch.device("cpu")
ADAM = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.0}
ADAM |= {"schedule": "constant"}


# --- train.max_batches_per_epoch ----------------------------------------------------------------


def trained(max_batches: int | None, epochs: int = 2) -> tuple[torch.nn.Module, int]:
    """A small model trained on 200 random examples in batches of 16 (13 an epoch); the
    batches it trained on."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g), torch.randint(0, 3, (200,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
    settings = TrainSettings(
        optim=ADAM, epochs=epochs, batch_size=16, seed=0, max_batches_per_epoch=max_batches
    )
    count = []
    loss = lambda out, b: hard_label_loss(out, b, y=y, classes=3)  # noqa: E731
    fit(model, x, loss, settings, x_val=x[:20], y_val=y[:20], on_batch=lambda: count.append(1))
    return model, len(count)


def test_max_batches_per_epoch_stops_each_epoch_there() -> None:
    assert trained(3)[1] == 2 * 3
    assert trained(None)[1] == 2 * 13


def test_without_a_cap_or_with_a_loose_one_training_is_bit_identical() -> None:
    """A cap the epoch never reaches draws exactly what no cap draws: normal runs unchanged."""
    free, _ = trained(None)
    loose, _ = trained(13)
    for a, b in zip(free.state_dict().values(), loose.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_debug_tiny_caps_the_epochs_and_the_default_does_not() -> None:
    assert _compose("train-teachers", ["debug=tiny"]).train.max_batches_per_epoch == 20
    assert _compose("distill", []).train.max_batches_per_epoch is None
    capped = _compose("distill", ["debug=tiny", "train.max_batches_per_epoch=null"])
    assert capped.train.max_batches_per_epoch is None  # the command line has the last word


@pytest.mark.parametrize("value", [0, -1, 2.5, "'many'"])
def test_a_bad_cap_is_refused_naming_the_key_and_the_fix(value: object) -> None:
    cfg = _compose("distill", [f"train.max_batches_per_epoch={value}"])
    with pytest.raises(UserError, match=r"train\.max_batches_per_epoch=.* must be an integer >= 1"):
        validate("distill", cfg)


def test_debug_tiny_applies_after_an_experiment_preset_in_either_spelling() -> None:
    preset = _compose("train-teachers", preset_as_choice(["+experiment=mnist_cnn_teachers"]))
    assert (preset.teachers.n, preset.train.epochs, preset.dataset.max_per_split) == (5, 10, None)
    for spelling in ("+experiment=mnist_cnn_teachers", "experiment=mnist_cnn_teachers"):
        tiny = _compose("train-teachers", preset_as_choice([spelling, "debug=tiny"]))
        assert (tiny.teachers.n, tiny.train.epochs, tiny.train.max_batches_per_epoch) == (2, 1, 20)
        assert tiny.dataset.name == "mnist" and tiny.dataset.max_per_split == 5000
        assert tiny.model.name == "cnn"  # the preset's choices stay


def test_a_folder_recorded_with_plus_experiment_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- +experiment=omit3\n- T=3\n")
    (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: distill\n")
    (folder / "manifest.json").write_text('{"stage": "distill", "status": "running"}')
    args = resume_args("distill", [f"resume={folder}", "+experiment=omit3"])
    assert args[:2] == ["experiment=omit3", "T=3"] and args[2].startswith("hydra.run.dir=")


def subset_digits(**settings: object) -> Data:
    cfg = {"name": "digits", "test_fraction": 0.25, "val_fraction": 0.1, "split_seed": 0}
    return load_dataset({**cfg, **settings})


def test_max_per_split_keeps_the_same_random_rows_of_each_split() -> None:
    whole, small = subset_digits(), subset_digits(max_per_split=100)
    assert [len(small.y_train), len(small.y_val), len(small.y_test)] == [100, 100, 100]
    assert set(small.train_rows.tolist()) <= set(whole.train_rows.tolist())
    assert small.train_rows.tolist() == sorted(small.train_rows.tolist())
    assert small.train_rows.max() > 1000  # drawn from all of it, not the first rows
    assert small.fingerprint != whole.fingerprint  # never mistaken for the whole dataset
    again = subset_digits(max_per_split=100)
    assert again.fingerprint == small.fingerprint and torch.equal(again.x_test, small.x_test)
    other = subset_digits(max_per_split=100, split_seed=1)
    assert not torch.equal(other.train_rows, small.train_rows)
    loose = subset_digits(max_per_split=10_000)  # above every split: the whole dataset
    assert loose.fingerprint == whole.fingerprint


def test_teachers_on_a_subset_are_refused_saying_so() -> None:
    whole, small = subset_digits(), subset_digits(max_per_split=100)
    tiny = {"run_dir": "T", "dataset": {"name": "digits", "fingerprint": small.fingerprint}}
    tiny["dataset"]["config"] = {"name": "digits", "max_per_split": 100}
    assert check_data(tiny, small) is None
    assert "it kept 100 of each split: dataset.max_per_split=100, as debug=tiny sets" in check_data(
        tiny, whole
    )


@pytest.mark.parametrize("value", [0, -3, 2.5, "'all'"])
def test_a_bad_max_per_split_is_refused(value: object) -> None:
    cfg = _compose("train-teachers", [f"dataset.max_per_split={value}"])
    with pytest.raises(UserError, match=r"dataset\.max_per_split=.* must be an integer >= 1"):
        validate("train-teachers", cfg)


# --- the MNIST loader -----------------------------------------------------------------------------


def test_mnist_images_are_bit_identical_to_astype_then_divide(tmp_path: Path) -> None:
    """The loader scales in place; the data (and so its fingerprint, which every cache and
    consumer checks) must be what `astype(float32) / 255.0` gave."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8),
        "train_y": np.arange(60, dtype=np.uint8) % 10,
        "test_x": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "test_y": np.arange(20, dtype=np.uint8) % 10,
    }
    write_idx(tmp_path / "MNIST" / "raw", arrays)
    cfg = OmegaConf.create(
        {"name": "mnist", "root": str(tmp_path), "download": False, "val_fraction": 0.1}
        | {"split_seed": 0, "normalize": "standardize"}
    )
    loaded = load_dataset(cfg)

    def before(x: np.ndarray) -> np.ndarray:
        return x[:, None].astype(np.float32) / 255.0

    expected = _finish(
        "mnist", cfg, before(arrays["train_x"]), arrays["train_y"], before(arrays["test_x"]),
        arrays["test_y"], 10,
    )  # fmt: skip
    assert loaded.fingerprint == expected.fingerprint
    assert torch.equal(loaded.x_test, expected.x_test)


def test_the_determinism_switch_without_compile_still_switches() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        make_deterministic(compile=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


# --- the teachers' inference speed -------------------------------------------------------------


def run_in(folder: Path) -> Run:
    return Run("distill", folder, CPU)


MLP = {"name": "mlp", "hidden": [8], "dropout": 0.0, "input_dropout": 0.0, "max_norm": None}


def tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MLP, (4,), 3).eval()


X_TEST = torch.randn(50, 4)
HERE = machine(CPU, 1024, 50)


def test_a_teachers_run_records_its_ensembles_speed_and_where_it_was_measured(
    tmp_path: Path,
) -> None:
    run = run_in(tmp_path)
    data = SimpleNamespace(x_test=X_TEST, y_test=torch.zeros(50, dtype=torch.long))
    record_inference_speed(run, [tiny_net(0), tiny_net(1)], data, 1024)
    record = run.info["inference"]
    assert record["examples_per_s"] > 0 and record["members"] == 2
    assert record["machine"] == HERE
    assert record["machine"]["host"] == socket.gethostname()


def test_recorded_speeds_combine_and_only_on_the_same_machine() -> None:
    same = [{"examples_per_s": 100.0, "machine": HERE}, {"examples_per_s": 300.0, "machine": HERE}]
    assert recorded_speed(same, HERE) == pytest.approx(75.0)  # 1 / (1/100 + 1/300)
    threads = {**HERE, "torch_threads": HERE["torch_threads"] + 1}
    assert recorded_speed([same[0], {**same[1], "machine": threads}], HERE) is None
    assert recorded_speed([same[0], None], HERE) is None  # a run from before the record
    assert recorded_speed([{**same[0], "machine": {**HERE, "host": "elsewhere"}}], HERE) is None


def teachers_run(folder: Path, record: dict | None) -> SimpleNamespace:
    """What inference_cost reads of a teachers run: its manifest, its member checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(2):
        files.append(folder / f"member_{i}.pt")
        save_tensors(files[-1], checkpoint(tiny_net(i), MLP, (4,), 3))
    manifests = [{"inference": record} if record else {}]
    return SimpleNamespace(source=str(folder), manifests=manifests, member_files=files)


def test_distill_reuses_the_recorded_figure_and_times_only_its_student(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed: list[list[str]] = []
    real = inference_speed.best_seconds

    def spy(groups, *args):  # type: ignore[no-untyped-def]
        timed.append(sorted(groups))
        return real(groups, *args)

    monkeypatch.setattr("distillrun.stages.distill.best_seconds", spy)
    teachers = teachers_run(tmp_path / "T", {"examples_per_s": 123.0, "machine": HERE})
    run = run_in(tmp_path / "D")
    cost = inference_cost(run, teachers, tiny_net(5), X_TEST, 1024)
    assert timed == [["student"]]
    assert cost["teacher_examples_per_s"] == 123.0
    assert cost["inference_speedup"] == pytest.approx(cost["student_examples_per_s"] / 123.0)
    assert run.info["inference"]["teachers"] == "recorded"
    assert str(tmp_path / "T") in run.info["inference"]["source"]


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (None, "recorded no figure"),  # a teachers run made before the record existed
        (
            {"examples_per_s": 123.0, "machine": {**HERE, "host": "elsewhere"}},
            "differs from this run in host",
        ),
    ],
)
def test_distill_times_the_teachers_when_their_figure_cannot_serve(
    tmp_path: Path, record: dict | None, why: str
) -> None:
    run = run_in(tmp_path / "D")
    cost = inference_cost(run, teachers_run(tmp_path / "T", record), tiny_net(5), X_TEST, 1024)
    assert cost["teacher_examples_per_s"] not in (None, 123.0)
    assert run.info["inference"]["teachers"] == "timed"
    assert why in run.info["inference"]["source"]


def test_members_without_checkpoints_are_not_timed(tmp_path: Path) -> None:
    teachers = teachers_run(tmp_path, None)
    assert len(member_models(teachers.member_files, CPU)) == 2
    teachers.member_files[1].unlink()  # an imported member given as logits has none
    assert member_models(teachers.member_files, CPU) == []


# --- the table and the command line ------------------------------------------------------------


def test_table_headers_are_never_cut_at_120_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=out, width=120, highlight=False))
    columns = ["model", "test accuracy", "test errors", "test NLL", "ECE", "agrees with teachers"]
    columns += ["parameters", "inference examples/s"]
    row = ["student, distilled (T=4, alpha=0.9, logit_mse)", 0.9, 100, 0.3, 0.01, 0.95]
    console.results_table("t", columns, [row + [1339412, 28748]], legend="a legend")
    text = out.getvalue()
    assert "…" not in text, text
    assert "parameters" in text and "examples/s" in text and "a legend" in text


def test_the_manifest_command_pins_the_runs_read(tmp_path: Path) -> None:
    record = {
        "stage": "distill",
        "overrides": ["T=2", "teachers=outputs/train-teachers/old"],
        "config": {"teachers": "outputs/train-teachers/old", "T": 2},
        "command": "",
    }
    run = Run("distill", tmp_path, CPU, record=record)  # as stages.common starts a run
    run.write_manifest(record)
    assert manifest(tmp_path)["command"] == (
        "distillrun distill T=2 teachers=outputs/train-teachers/old"
    )
    run.add_input("teachers", "/runs/with space/T")  # found by the stage, after the start
    assert manifest(tmp_path)["command"] == (
        "distillrun distill T=2 'teachers=\"/runs/with space/T\"'"
    )


@pytest.mark.slow
def test_a_tiny_distill_reuses_its_tiny_teachers_figure_end_to_end(tmp_path: Path) -> None:
    # The teachers in this process, the distill in its own: the figure is found across processes.
    tiny = ["debug=tiny", "threads=1"]
    distillrun_here(tmp_path, "train-teachers", *tiny, env=ONE_THREAD)
    (teachers,) = runs(tmp_path, "train-teachers")
    assert manifest(teachers)["inference"]["machine"]["torch_threads"] == 1
    result = distillrun(tmp_path, "distill", *tiny, "loss=logit_mse", env=ONE_THREAD)
    (student,) = runs(tmp_path, "distill")
    m = manifest(student)
    assert m["inference"]["teachers"] == "recorded"
    assert (
        m["metrics"]["teacher_examples_per_s"] == manifest(teachers)["inference"]["examples_per_s"]
    )
    assert m["command"].endswith(f"teachers={teachers.resolve()}")
    assert "distilled (T=4, alpha=0.9, logit_mse)" in result.stdout  # whole, on one line
    assert "…" not in result.stdout
    bad = distillrun_here(tmp_path, "distill", "train.max_batches_per_epoch=0", check=None)
    assert_one_line_error(bad, "train.max_batches_per_epoch=0", "integer >= 1")


# --- freed memory kept for reuse (core/memory.py) ------------------------------------------------

FAULTS_OF_A_CONV_PASS = """
import resource, sys, torch
from distillrun.core.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
conv = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.MaxPool2d(2))
x = torch.zeros(1024, 1, 28, 28)  # to 100 MB of activations, above glibc's mmap threshold
with torch.no_grad():
    for _ in range(5):  # the heap settles in a few passes (some freed blocks are a bit short)
        conv(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_passes_over_a_big_batch_stop_page_faulting_once_the_heap_settles() -> None:
    # Without it, every pass maps its activations afresh: 25,000 and more faults of 4 KB pages.
    script = [sys.executable, "-c", FAULTS_OF_A_CONV_PASS, "keep"]
    out = subprocess.run(script, capture_output=True, text=True, check=True)
    assert int(out.stdout) < 1000, out.stdout
