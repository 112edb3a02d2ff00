"""Data-parallel training under torchrun, on the CPU with gloo and two or three processes.

N processes with the same global batch take the same steps as one: the views and batches are
drawn alike in every process, each trains on its share of every batch, and DDP averages
gradients weighted by each share's size; a last batch of 2 examples goes to process 0 alone,
the others adding zero gradients. Without BatchNorm or dropout (whose masks are per process) the
only difference left is the order of floating-point sums, so the tolerance is float32's: 1e-5
relative on losses and weights, and identical error counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    without_timings,
)

from distillrun.core.distributed import deal

# An MLP without dropout on shifted views of digits, checkpointed every epoch. Digits has 1212
# training examples: batches of 110 end with one of 2, fewer than 2 per process.
TEACHERS = [
    "train-teachers",
    "teachers.n=2",
    "train.epochs=4",
    "train.batch_size=110",
    "train.checkpoint_every=0",
    "model.hidden=[64]",
    "model.dropout=0",
    "model.input_dropout=0",
    "augment=shift",
    "augment.pixels=1",
    "threads=1",
    "progress=false",
]


def test_every_example_of_a_batch_is_dealt_once_and_none_alone() -> None:
    for processes in (1, 2, 3, 4):
        for n in range(1, 30):
            shares = [range(n)[deal(n, processes, r)] for r in range(processes)]
            assert sorted(i for share in shares for i in share) == list(range(n))
            assert len(shares[0]) == n or len(shares[0]) >= 2  # process 0 is never idle
            assert all(len(share) != 1 for share in shares) or n == 1
            if n >= 2 * processes:  # the usual case: examples r, r+N, ... to process r
                assert shares == [range(n)[r::processes] for r in range(processes)]


def torchrun(cwd: Path, *args: str, wait: bool = True, processes: int = 2) -> subprocess.Popen:
    """`torchrun --nproc_per_node=<processes> -m distillrun ...` (as `python -m
    torch.distributed.run`), with the temporary folder under cwd."""
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + [f"--nproc_per_node={processes}"]
        + ["-m", "distillrun", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "TMPDIR": str(tmp), **ONE_THREAD},
    )
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
        proc.stdout_text = out  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same teachers run in one process and in two."""
    root = tmp_path_factory.mktemp("ddp")
    distillrun_here(root, *TEACHERS, "hydra.run.dir=one", env=ONE_THREAD)
    out = torchrun(root, *TEACHERS, "hydra.run.dir=two").stdout_text
    (root / "two.log").write_text(out)
    return root / "one", root / "two"


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b))


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(pair: tuple[Path, Path]) -> None:
    one, two = pair
    assert manifest(one)["dataset"]["sizes"]["train"] % 110 == 2  # a last batch of 2
    lines_one, lines_two = metric_lines(one), metric_lines(two)
    assert len(lines_one) == len(lines_two) == 8  # 2 members x 4 epochs
    for a, b in zip(lines_one, lines_two, strict=True):
        assert (a["model"], a["epoch"], a["val_errors"]) == (
            b["model"],
            b["epoch"],
            b["val_errors"],
        )
        assert close(a["train_loss"], b["train_loss"]) and close(a["val_nll"], b["val_nll"]), (a, b)
    m1, m2 = manifest(one), manifest(two)
    assert m2["status"] == "complete" and m2["processes"] == 2 and "processes" not in m1
    for key in ("val_errors", "test_errors"):
        assert m1["metrics"][key] == m2["metrics"][key]
    for name in ("member_0.pt", "member_1.pt"):
        w1 = torch.load(one / name, weights_only=True)["state_dict"]
        w2 = torch.load(two / name, weights_only=True)["state_dict"]
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
def test_only_process_zero_writes_and_speaks(pair: tuple[Path, Path]) -> None:
    root = pair[1].parent
    assert sorted(p.name for p in root.iterdir()) == ["one", "outputs", "tmp", "two", "two.log"]
    assert (root / "two.log").read_text().count("run folder:") == 1
    leftovers = [p.name for p in (root / "tmp").iterdir() if p.name.startswith("distillrun-")]
    assert leftovers == []  # the other process's private folder is gone
    assert list((root / "outputs").iterdir()) == []  # (the output root, made by the checks)
    assert not (pair[1] / "resume").exists()
    assert manifest(pair[1])["overrides"] == [*TEACHERS[1:], "hydra.run.dir=two"][:-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["evaluate"], "evaluate does not train: run it without torchrun"),
        (["distill", "-m", "T=2,4"], "a sweep (-m) under torchrun"),
        (["distill", "device=cuda:1"], "device=cuda:1 under torchrun"),
        (["distill", "dataset=mnist", "dataset.download=true"], "download once per process"),
    ],
)
def test_what_torchrun_cannot_run_is_one_line_from_process_zero(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert_one_line_error(distillrun(tmp_path, *args, env=env, check=None), fragment)
    if args == ["evaluate"]:
        other = distillrun(tmp_path, *args, env={**env, "RANK": "1"}, check=2)
        assert other.stdout == other.stderr == ""  # process 0 speaks for all
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_three_processes_train_specialists_whose_last_batch_is_two(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Half-and-half batches of 242 (121 from the specialist's classes): the generalist's two
    clusters hold 485 and 727 training examples, so each specialist's last batch has 2."""
    specialists = ["specialists", "dataset=digits", "debug=tiny", "specialists.k=2"]
    specialists += [f"generalist={pair[0]}", "train.batch_size=242", "threads=1"]
    distillrun_here(tmp_path, *specialists, "hydra.run.dir=one", env=ONE_THREAD)
    torchrun(tmp_path, *specialists, "hydra.run.dir=three", processes=3)
    members = manifest(tmp_path / "one")["metrics"]["members"]
    assert [m["train_examples"] % 121 for m in members] == [1, 1]  # last batches of 2
    a, b = metric_lines(tmp_path / "one"), metric_lines(tmp_path / "three")
    assert len(a) == len(b) == 2  # a line per specialist and epoch
    for x, y in zip(a, b, strict=True):
        assert (x["model"], x["val_errors"]) == (y["model"], y["val_errors"])
        assert close(x["train_loss"], y["train_loss"]) and close(x["val_nll"], y["val_nll"])
    assert manifest(tmp_path / "three")["processes"] == 3


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_numbers(tmp_path: Path) -> None:
    """A student on cached views, with dropout (each process draws its own masks, and draws them
    again when resumed), killed with SIGKILL; its teachers, found as the newest run, are process
    0's choice and stay its teachers on resume although a newer run appeared."""
    teachers = ["train-teachers", "debug=tiny", "teachers.n=1", "threads=1", "model.dropout=0"]
    distillrun_here(
        tmp_path,
        *teachers,
        "model.input_dropout=0",
        "hydra.run.dir=outputs/train-teachers/a",
        env=ONE_THREAD,
    )
    student = ["distill", "train.epochs=4", "train.checkpoint_every=0", "model.hidden=[32]"]
    student += ["model.dropout=0.3", "augment=shift", "augment.pixels=1"]  # cached views
    student += ["baseline=false", "threads=1", "progress=false"]
    torchrun(tmp_path, *student, "teachers=outputs/train-teachers/a", "hydra.run.dir=reference")
    proc = torchrun(tmp_path, *student, "hydra.run.dir=killed", wait=False)
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "resume" / "student.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in [*map(int, children), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # A newer teachers run appears: the resumed run must keep a, in both processes.
    distillrun_here(
        tmp_path, *teachers, "seed=7", "hydra.run.dir=outputs/train-teachers/b", env=ONE_THREAD
    )
    torchrun(tmp_path, "distill", f"resume={tmp_path / 'killed'}")
    resumed = manifest(tmp_path / "killed")
    assert resumed["status"] == "complete" and resumed["inputs"]["teachers"].endswith("/a")
    assert metric_lines(tmp_path / "killed") == metric_lines(tmp_path / "reference")
    reference = manifest(tmp_path / "reference")["metrics"]
    assert without_timings(resumed["metrics"]) == without_timings(reference)
    assert (tmp_path / "killed" / "student.pt").read_bytes() == (
        tmp_path / "reference" / "student.pt"
    ).read_bytes()


@pytest.mark.slow
def test_a_batchnorm_net_trains_with_its_statistics_from_process_zero(tmp_path: Path) -> None:
    """Batches of 121 end with one of 2, which process 0 trains on alone: process 1 passes zero
    rows through the convolutions and BatchNorm, for a zero gradient."""
    args = ["train-teachers", "debug=tiny", "teachers.n=1", "model=resnet8", "threads=1"]
    args += ["train.batch_size=121"]
    torchrun(tmp_path, *args, "hydra.run.dir=bn")
    m = manifest(tmp_path / "bn")
    assert m["status"] == "complete" and m["processes"] == 2
    state = torch.load(tmp_path / "bn" / "member_0.pt", weights_only=True)["state_dict"]
    assert int(state["features.1.num_batches_tracked"]) > 0  # statistics were kept
    assert m["metrics"]["test_accuracy"] > 0.2  # digits, one epoch: above chance (0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train-teachers", "T=0"], "unknown key 'T'"),  # refused before any process starts
        (["evaluate"], "evaluate does not train"),
        (["train-teachers", "device=cuda:1"], "device=cuda:1 under torchrun"),  # by the processes
    ],
)
def test_distillrun_torchrun_says_a_refusal_in_one_line_and_exits_2(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    """Bare torchrun adds its ~40-line failure report and exits 1; `distillrun torchrun` not."""
    result = distillrun(
        tmp_path, "torchrun", "--nproc_per_node=2", *args, "debug=tiny", "threads=1", check=None
    )
    assert_one_line_error(result, fragment)
    assert result.stdout.strip() == ""
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))
