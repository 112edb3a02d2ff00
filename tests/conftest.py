"""Shared helpers and settings of the test suite.

Test modules import the helpers from here (`from conftest import distillrun, ...`), never from
each other. Markers: `slow` (end-to-end runs of the installed command in a subprocess; `make
test-fast` leaves them out) and `gpu` (needs CUDA; skipped without it).
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process (`make test` runs one per core): the workers' torch and the
    # commands they start would otherwise oversubscribe the cores, and contending OpenMP
    # threads slow small models tenfold. Set before torch and numpy are imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import hashlib
import io
import json
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

DISTILLRUN = str(Path(sys.executable).parent / "distillrun")
TINY_TEACHERS = [
    "teachers.n=2",
    "train.epochs=2",
    "train.batch_size=32",
    "model.hidden=[32]",
    "progress=false",
]
TINY_STUDENT = ["train.epochs=2", "model.hidden=[16]", "progress=false"]


def distillrun(cwd: Path, *args: str, env: dict[str, str] | None = None, check: int | None = 0):
    result = subprocess.run(
        [DISTILLRUN, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        timeout=300,
    )
    if check is not None:
        assert result.returncode == check, result.stdout + result.stderr
    return result


def distillrun_here(
    cwd: Path, *args: str, env: dict[str, str] | None = None, check: int | None = 0
) -> subprocess.CompletedProcess:
    """`distillrun(cwd, *args)` without the subprocess: the dispatcher (`distillrun.cli.main`)
    called in this process, in `cwd`, with the same argv, environment, captured output and
    exit status (sys.exit's code; a traceback and 1 for an escaped exception). It saves the
    seconds a new process spends importing torch, so use it where a process adds nothing;
    signals, kills, torchrun, launchers and the console script itself still need `distillrun`.
    The process-wide state a run changes (cwd, argv, environment, signal handlers, torch
    threads, logging handlers, the last sweep's summary) is put back afterwards."""
    from distillrun import cli
    from distillrun.runs import summary

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    root = logging.getLogger()
    log_handlers, log_level = list(root.handlers), root.level
    import torch

    threads = torch.get_num_threads()
    os.environ.update({"HYDRA_FULL_ERROR": "0", **(env or {})})
    if "OMP_NUM_THREADS" in (env or {}):  # torch read it at import: tell it again
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    sys.argv = [DISTILLRUN, *args]
    summary.last_sweep = None
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code
                if isinstance(code, str):  # sys.exit("message"), as Python prints it
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        root.handlers[:], root.level = log_handlers, log_level
        torch.set_num_threads(threads)
    result = subprocess.CompletedProcess(
        [DISTILLRUN, *args], code or 0, out.getvalue(), err.getvalue()
    )
    if check is not None:
        assert result.returncode == check, result.stdout + result.stderr
    return result


def tool(tool: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m distillrun.tools.<tool> *args` in its own process, one thread per step: for
    what a process is needed for (the tools' own one-line errors and exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", f"distillrun.tools.{tool}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def tool_here(tool: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m distillrun.tools.<tool> *args` in this process, each of its steps through
    `distillrun_here` (the tools start `python -m distillrun` per step, reproduce._stage): the
    same steps, folders, output and exit status, without a Python start-up and a torch import
    per step. The tools' own errors and signals are tested in subprocesses."""
    import importlib

    from distillrun.tools import reproduce

    def stage_here(stage_args: list[str]) -> int:
        step = distillrun_here(Path.cwd(), *stage_args, check=None)
        print(step.stdout, end="")
        print(step.stderr, end="", file=sys.stderr)
        return step.returncode

    module = importlib.import_module(f"distillrun.tools.{tool}")
    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_argv = os.getcwd(), sys.argv
    sigterm = signal.getsignal(signal.SIGTERM)
    code: int | str | None = 0
    try:
        os.chdir(cwd)
        sys.argv = [tool, *args]  # (a tool records its command line from sys.argv)
        with (
            pytest.MonkeyPatch.context() as patch,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            patch.setattr(reproduce, "_stage", stage_here)
            try:
                module.main(list(args))
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess([tool, *args], code or 0, out.getvalue(), err.getvalue())


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def runs(root: Path, stage: str) -> list[Path]:
    base = root / "outputs" / stage
    return sorted(p for p in base.iterdir() if p.name != "multirun") if base.is_dir() else []


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# One thread: on a busy 2-core machine, two contending threads make tiny epochs 10x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


TIMINGS = {"minutes", "seconds", "inference_speedup"}
TIMINGS |= {"teacher_examples_per_s", "student_examples_per_s"}


def without_timings(value):
    """Metrics minus wall-clock times and speeds, which no two runs share."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def metric_lines(folder: Path) -> list[dict]:
    return [without_timings(json.loads(line)) for line in (folder / "metrics.jsonl").open()]


def _signals_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (a suite run under nohup ignores it)


def start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The command in the background, with SIGINT and SIGHUP as at a terminal: a suite started
    in the background of a non-interactive shell inherits SIGINT ignored, and Python keeps it
    so."""
    return subprocess.Popen(
        [DISTILLRUN, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **ONE_THREAD, **(env or {})},
        preexec_fn=_signals_as_at_a_terminal,
    )


def signal_when(proc: subprocess.Popen, pattern: str, cwd: Path, signum: int) -> None:
    """Send `signum` to `proc` as soon as a file matching `pattern` appears under cwd."""
    deadline = time.monotonic() + 240
    while not list(cwd.glob(pattern)):
        assert proc.poll() is None, "the run ended before it could be stopped: " + str(
            proc.communicate()
        )
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(signum)


IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file of uint8 data: magic 0x0000 08 <ndim>, big-endian sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(raw: Path, arrays: dict[str, np.ndarray]) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_NAMES.items():
        (raw / name).write_bytes(idx_bytes(arrays[key]))


def write_cifar100(
    root: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> dict:
    """CIFAR-100's python files in torchvision's layout (root/cifar-100-python/{train,test,meta}:
    pickles of uint8 rows of 3072 pixels, fine and coarse labels; coarse = fine // 5 here).
    torchvision checks each file's md5, so this returns the lists to put on its CIFAR100 class
    in place of the real files' ({"train_list": ..., "test_list": ..., "meta": ...})."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> list[str]:
        blob = pickle.dumps(obj)
        (folder / name).write_bytes(blob)
        return [name, hashlib.md5(blob).hexdigest()]

    def split(x: np.ndarray, y: np.ndarray) -> dict:
        labels = np.asarray(y).tolist()
        return {"data": x, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}

    meta_name, meta_md5 = dump("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return {
        "train_list": [dump("train", split(train_x, train_y))],
        "test_list": [dump("test", split(test_x, test_y))],
        "meta": {"filename": meta_name, "key": "fine_label_names", "md5": meta_md5},
    }


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this source tree, built from a clean copy (setuptools would reuse a stale
    build/ folder, which could hide a file the build no longer ships)."""
    tmp = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".*", "build", "outputs", "*.egg-info", "__pycache__")
    shutil.copytree(Path(__file__).parents[1], tmp / "src", ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(tmp / "src")],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp.glob("distillrun-*.whl")
    return wheel


# The files that take longest (pytest --durations=0 on 2 cores, 2026-12-03: the kills, signals,
# launchers and torchrun runs, which need processes of their own), in that order. `make test`
# hands whole files to its workers in collection order, so starting with the longest lets the
# workers finish together.
LONGEST_FIRST = (
    "test_reliability.py",
    "test_tracking.py",
    "test_sweeps.py",
    "test_augment.py",
    "test_distributed.py",
    "test_cli.py",
    "test_cifar.py",
    "test_io.py",
    "test_specialists_cli.py",
    "test_reproduce.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
    if any("gpu" in item.keywords for item in items):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU")
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(skip)
