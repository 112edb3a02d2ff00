"""`make bench` (python -m distillrun.bench): distillrun against plain PyTorch, side by side.

Every figure is a ratio measured in one process against a reference written here, so that a
noisy machine slows both sides alike; each side is run in alternation and the best of its
repeats is kept. Writes the figures to outputs/bench.json and prints a table.

    python -m distillrun.bench [--quick] [--out outputs/bench.json] [--mnist ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distillrun.ensemble import combine
from distillrun.losses import distillation_loss
from distillrun.models import build_model
from distillrun.train import TrainSettings, fit, predict

STUDENT = {"name": "mlp", "hidden": [800, 800], "dropout": 0.0, "input_dropout": 0.0}
TEACHER = {"name": "mlp", "hidden": [1200, 1200], "dropout": 0.5, "input_dropout": 0.2}
ADAM = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0}
ADAM |= {"schedule": "constant", "step_size": 10, "gamma": 0.1}
BATCH, T, ALPHA = 128, 4.0, 0.9
GOALS = {
    "train_throughput_ratio": (">=", 0.95),
    "sweep_speedup": (">=", 3.0),
    "kl_inference_examples_per_s": (">=", 20000),
    "matmul_fraction": (">=", 0.6),
    "help_seconds": ("<=", 0.5),
    "peak_rss_mb": ("<=", 2000),
}


def mnist_like(root: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real MNIST training images when `root` has them, else random data of its shape."""
    if root and (Path(root) / "MNIST").is_dir():
        from distillrun.data import load_dataset

        data = load_dataset(
            {"name": "mnist", "root": root, "download": False, "val_fraction": 0.0, "split_seed": 0}
        )
        return data.x_train[:n].flatten(1).contiguous(), data.y_train[:n]
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def mlp_train_flops(model: torch.nn.Module) -> int:
    """Multiply-adds of forward (1x) and backward (2x) per example, as FLOPs (x2)."""
    macs = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    return 6 * macs


def best_of(repeats: int, *sides: Callable[[], float]) -> list[float]:
    """Run the sides in alternation `repeats` times; the best (lowest) time of each."""
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(repeats):
        for i, side in enumerate(sides):
            times[i].append(side())
    return [min(t) for t in times]


# --- the plain PyTorch references -----------------------------------------------------------


def reference_epochs(model, x, y, soft, epochs: int, teachers=None) -> float:
    """A minimal hand-written distillation loop; with `teachers`, their forward pass on every
    batch instead of cached soft targets. Returns seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            xb = x[idx]
            if teachers is None:
                log_p = soft[idx]
            else:
                with torch.no_grad():
                    logits = torch.stack([t(xb) for t in teachers])
                    log_p = combine(logits, "arithmetic", T)
            out = model(xb)
            loss = ALPHA * T * T * F.kl_div(
                F.log_softmax(out / T, dim=1), log_p, log_target=True, reduction="batchmean"
            ) + (1 - ALPHA) * F.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def distillrun_epochs(model, x, y, soft, epochs: int, x_val, y_val) -> float:
    """distillrun's training loop (train.fit) with the loss distill uses, validation and the
    resumable checkpoints at the default cadence included, as in a run. Returns seconds."""
    folder = tempfile.TemporaryDirectory()
    start = time.perf_counter()
    fit(
        model,
        x,
        lambda out, b: distillation_loss(out, soft[b], y[b], T, ALPHA),
        TrainSettings(ADAM, epochs=epochs, batch_size=BATCH),
        x_val=x_val,
        y_val=y_val,
        state_path=Path(folder.name) / "student.pt",
    )
    seconds = time.perf_counter() - start
    folder.cleanup()
    return seconds


# --- the figures ------------------------------------------------------------------------------


def train_throughput(x, y, epochs: int, repeats: int) -> dict[str, float]:
    """Samples/s of distillrun's loop over the hand-written one, same student, data, batch."""
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    soft = F.log_softmax(
        torch.randn(len(x_tr), 10, generator=torch.Generator().manual_seed(1)) / T, dim=1
    )

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (784,), 10)

    ours, ref = best_of(
        repeats,
        lambda: distillrun_epochs(student(), x_tr, y_tr, soft, epochs, x_val, y_val),
        lambda: reference_epochs(student(), x_tr, y_tr, soft, epochs),
    )
    samples = epochs * len(x_tr)
    flops = mlp_train_flops(student()) * samples
    return {
        "train_throughput_ratio": ref / ours,
        "train_samples_per_s": samples / ours,
        "reference_samples_per_s": samples / ref,
        "train_gflops": flops / ours / 1e9,
        "reference_gflops": flops / ref / 1e9,
    }


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def sweep_speedup(x, y, jobs: int, epochs: int, members: int) -> dict[str, float]:
    """An 8-job T x alpha sweep: the reference runs the teachers' forward pass on every batch;
    distillrun computes their outputs once (as train-teachers does) and every job reads them."""
    torch.manual_seed(0)
    teachers = [build_model(TEACHER, (784,), 10).eval() for _ in range(members)]
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (784,), 10)

    def reference() -> float:
        return sum(
            reference_epochs(student(), x_tr, y_tr, None, epochs, teachers) for _ in range(jobs)
        )

    def ours() -> float:
        start = time.perf_counter()
        logits = torch.stack([predict(t, torch.cat([x_tr, x_val])) for t in teachers])
        cached = time.perf_counter() - start
        soft = combine(logits[:, : len(x_tr)], "arithmetic", T)
        return cached + sum(
            distillrun_epochs(student(), x_tr, y_tr, soft, epochs, x_val, y_val)
            for _ in range(jobs)
        )

    ours_s, ref_s = best_of(2, ours, reference)
    return {
        "sweep_speedup": ref_s / ours_s,
        "sweep_seconds": ours_s,
        "sweep_reference_seconds": ref_s,
    }


def kl_inference(classes: int, specialists: int, n: int, repeats: int = 3) -> float:
    """Test examples per second of the generalist-plus-specialists KL combination: each
    specialist covers classes / specialists classes plus a dustbin, the generalist's top
    class picks the active ones (evaluate's defaults)."""
    from distillrun.inference import active_specialists, combine_kl

    g = torch.Generator().manual_seed(0)
    size = classes // specialists
    clusters = [list(range(m * size, (m + 1) * size)) for m in range(specialists)]
    generalist = torch.randn(n, classes, generator=g) * 3
    views = [torch.randn(n, size + 1, generator=g) * 3 for _ in clusters]
    active = active_specialists(generalist, clusters, 1)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        combine_kl(generalist, clusters, views, active)
        best = min(best, time.perf_counter() - start)
    return n / best


def teachers_scaling(x, y, members: list[int]) -> dict[str, float]:
    """Seconds of one distill epoch as the ensemble grows: distillrun reads cached outputs
    (flat in teachers.n), the reference runs every member on every batch (linear)."""
    out = {}
    x_val, y_val = x[:200], y[:200]
    for n in members:
        torch.manual_seed(0)
        teachers = [build_model(TEACHER, (784,), 10).eval() for _ in range(n)]
        start = time.perf_counter()
        soft = combine(torch.stack([predict(t, x) for t in teachers]), "arithmetic", T)
        cache = time.perf_counter() - start
        torch.manual_seed(0)
        ours = distillrun_epochs(build_model(STUDENT, (784,), 10), x, y, soft, 1, x_val, y_val)
        torch.manual_seed(0)
        ref = reference_epochs(build_model(STUDENT, (784,), 10), x, y, None, 1, teachers)
        out[f"epoch_seconds_teachers_{n}"] = ours
        out[f"cache_seconds_teachers_{n}"] = cache
        out[f"reference_epoch_seconds_teachers_{n}"] = ref
    return out


def help_seconds(repeats: int = 5) -> float:
    command = [str(Path(sys.executable).parent / "distillrun"), "--help"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb(mnist_root: str | None) -> dict[str, Any]:
    """Peak resident memory of `distillrun distill dataset=mnist` (in a child process)."""
    if not (mnist_root and (Path(mnist_root) / "MNIST").is_dir()):
        return {"peak_rss_mb": None, "peak_rss_note": "no MNIST at --mnist"}
    exe = str(Path(sys.executable).parent / "distillrun")
    common = [f"dataset.root={Path(mnist_root).resolve()}", "dataset=mnist", "progress=false"]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = [
            exe,
            "train-teachers",
            *common,
            "teachers.n=5",
            "train.epochs=1",
            "model=mlp",
            "model.hidden=[64]",
        ]
        subprocess.run(teachers, cwd=tmp, capture_output=True, check=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run(
            [exe, "distill", *common, "train.epochs=1"], cwd=tmp, capture_output=True, check=True
        )
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:  # RUSAGE_CHILDREN is the largest child so far: train-teachers was bigger
        return {"peak_rss_mb": after / 1024, "peak_rss_note": "bounded by train-teachers"}
    return {"peak_rss_mb": after / 1024, "distill_mnist_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    parser.add_argument("--out", default="outputs/bench.json")
    parser.add_argument(
        "--mnist", default=os.environ.get("DISTILLRUN_DATA", "../shared/data/mnist")
    )
    args = parser.parse_args(argv)

    quick = args.quick
    x, y = mnist_like(args.mnist, 6000 if quick else 60000)
    figures: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    figures["matmul_gflops"] = matmul_gflops()
    figures |= train_throughput(x, y, epochs=1 if quick else 2, repeats=2 if quick else 3)
    figures["matmul_fraction"] = figures["train_gflops"] / figures["matmul_gflops"]
    figures["reference_matmul_fraction"] = figures["reference_gflops"] / figures["matmul_gflops"]
    figures |= sweep_speedup(x[:2000] if quick else x[:10000], y, jobs=8, epochs=2, members=5)
    figures["kl_inference_examples_per_s"] = kl_inference(100, 10, 2000 if quick else 10000)
    for classes in (20, 100, 1000):  # how evaluate's inference grows: specialists of 10 classes
        figures[f"kl_inference_examples_per_s_{classes}_classes"] = kl_inference(
            classes, classes // 10, 2000
        )
    figures |= teachers_scaling(x[:2000], y[:2000], [1, 5, 10])
    figures["help_seconds"] = help_seconds()
    figures |= peak_rss_mb(None if quick else args.mnist)
    report(figures, Path(args.out))


def report(figures: dict[str, Any], out: Path) -> None:
    from distillrun.artifacts import write_json
    from distillrun.console import results_table

    rows = []
    for key, (op, goal) in GOALS.items():
        value = figures.get(key)
        ok = None if value is None else (value >= goal if op == ">=" else value <= goal)
        rows.append(
            [key, value, f"{op} {goal:g}", {None: "not measured", True: "yes", False: "NO"}[ok]]
        )
    results_table("distillrun bench", ["figure", "value", "goal", "met"], rows)
    figures["goals_met"] = {r[0]: r[3] == "yes" for r in rows}
    write_json(out, figures)
    print(
        json.dumps(
            {k: v for k, v in figures.items() if k not in GOALS and k != "goals_met"},
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
