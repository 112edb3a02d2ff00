"""`make bench` (python -m distillrun.tools.bench): distillrun against plain PyTorch, side by side.

Every figure is a ratio measured in one process against a reference written here, so that a
noisy machine slows both sides alike; each side is run in alternation and the best of its
repeats is kept. Writes the figures to outputs/bench.json and prints a table.

    python -m distillrun.tools.bench [--quick] [--only losses|commands]
        [--out outputs/bench.json] [--mnist ../shared/data/mnist]
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

from distillrun.core.models import build_model, checkpoint
from distillrun.core.train import TrainSettings, autocast, fit, predict
from distillrun.method.augment import Views
from distillrun.method.ensemble import combine
from distillrun.method.losses import distillation_loss
from distillrun.method.teacher_outputs import CachedLogits, view_cache
from distillrun.runs import artifacts

STUDENT = {"name": "mlp", "hidden": [800, 800], "dropout": 0.0, "input_dropout": 0.0}
TEACHER = {"name": "mlp", "hidden": [1200, 1200], "dropout": 0.5, "input_dropout": 0.2}
CNN_TEACHER = {"name": "cnn", "channels": [32, 64], "hidden": 128, "dropout": 0.3}  # reproduce's
SHIFT = Views(1, False, "replicate")  # 9 views
# The CIFAR benchmark's pair and recipe (conf/experiment/cifar100_resnet32x4_resnet8x4.yaml).
RESNET8X4 = {"name": "cifar_resnet", "depth": 8, "widths": [32, 64, 128, 256]}
RESNET32X4 = {"name": "cifar_resnet", "depth": 32, "widths": [32, 64, 128, 256]}
CROP_FLIP = Views(4, True, "zeros")  # 162 views
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}
SGD |= {"schedule": "constant", "step_size": 10, "gamma": 0.1}
ADAM = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0}
ADAM |= {"schedule": "constant", "step_size": 10, "gamma": 0.1}
BATCH, T, ALPHA = 128, 4.0, 0.9
# loss_throughput's variants: name -> (loss=, loss.standardize), kd first (the reference)
LOSS_VARIANTS = {
    "kd": ("kd", False),
    "logit_mse": ("logit_mse", False),
    "dkd": ("dkd", False),
    "dist": ("dist", False),
    "nkd": ("nkd", False),
    "kd_ls": ("kd", True),
    "dkd_ls": ("dkd", True),
}
GOALS = {
    "train_throughput_ratio": (">=", 0.95),
    "sweep_speedup": (">=", 3.0),
    "augmented_sweep_speedup": (">=", 3.0),
    "views_throughput_ratio": (">=", 0.9),
    # each loss of LOSS_VARIANTS on cached views, against kd in the same run
    **{
        f"loss_throughput_ratio_{name}": (">=", 0.9)
        for name in ("logit_mse", "dkd", "dist", "nkd", "kd_ls", "dkd_ls")
    },
    "cifar_kd_speedup": (">=", 1.0),  # on a CUDA GPU only
    "kl_inference_examples_per_s": (">=", 20000),
    "matmul_fraction": (">=", 0.6),
    "help_seconds": ("<=", 0.5),
    "stage_help_seconds": ("<=", 1.0),  # distillrun distill --help
    "cfg_job_seconds": ("<=", 1.0),  # distillrun distill T=2 --cfg job
    "tab_seconds": ("<=", 0.5),  # one Tab of shell completion
    "peak_rss_mb": ("<=", 2000),
}


def mnist_like(root: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real MNIST training images when `root` has them, else random data of its shape."""
    if root and (Path(root) / "MNIST").is_dir():
        from distillrun.core.data import load_dataset

        data = load_dataset(
            {"name": "mnist", "root": root, "download": False, "val_fraction": 0.0, "split_seed": 0}
        )
        return data.x_train[:n].contiguous(), data.y_train[:n]
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


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


def reference_epochs(model, x, y, soft, epochs: int, teachers=None, views=None) -> float:
    """A minimal hand-written distillation loop; with `teachers`, their forward pass on every
    batch instead of cached soft targets, on a random view of each image with `views`.
    Returns seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            xb = x[idx]
            if views is not None:
                xb = views.apply(xb, torch.randint(0, views.count, (len(idx),), generator=g))
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


def distillrun_epochs(
    model, x, y, cached, epochs: int, x_val, y_val, views=None, loss_fn=None
) -> float:
    """distillrun's training loop (train.fit) with the loss distill uses (the members' cached
    logits combined at T batch by batch, CachedLogits; or `loss_fn`), validation and the
    resumable checkpoints at the default cadence included, as in a run. Returns seconds."""
    folder = tempfile.TemporaryDirectory()

    def kd_loss(out: torch.Tensor, b: Any) -> torch.Tensor:
        targets = combine(cached.member_logits(b), "arithmetic", T)
        return distillation_loss(out, targets, y[b.idx], T, ALPHA)

    loss_fn = loss_fn or kd_loss

    start = time.perf_counter()
    fit(
        model,
        x,
        loss_fn,
        TrainSettings(ADAM, epochs=epochs, batch_size=BATCH, augment=views),
        x_val=x_val,
        y_val=y_val,
        state_path=Path(folder.name) / "student.pt",
    )
    seconds = time.perf_counter() - start
    folder.cleanup()
    return seconds


def bench_view_cache(
    folder: str,
    files: list[Path],
    x: torch.Tensor,
    num_classes: int,
    views: Views,
    batch_size: int,
    device: torch.device,
) -> CachedLogits:
    """The members' logits on every view of every example of `x`, built as distill builds
    them (teaching.view_cache, checkpoints read from `files`), in `folder`."""
    cached, _ = view_cache(
        sources=[{f.name: artifacts.file_sha256(f) for f in files}],
        member_files=files,
        fingerprint="bench",
        cache_dir=Path(folder),
        x=x,
        transfer=torch.arange(len(x)),
        num_classes=num_classes,
        augmentation=views,
        top_k=None,
        max_mb=math.inf,
        batch_size=batch_size,
        device=device,
        say=lambda line: None,
    )
    return cached


# --- the figures ------------------------------------------------------------------------------


def cifar_kd_throughput(
    device: torch.device,
    precision: str,
    n: int,
    epochs: int,
    repeats: int,
    teacher_cfg: dict[str, Any] = RESNET32X4,
    student_cfg: dict[str, Any] = RESNET8X4,
    views: Views = CROP_FLIP,
    pair: str = "resnet32x4 -> resnet8x4",
) -> dict[str, Any]:
    """Samples/s of resnet8x4 distilled from resnet32x4 on CIFAR-shaped data (n random images
    on the device) with crop+flip views: distillrun (fit, the teacher's logits on all 162 views
    from the view cache, on the device) against a plain loop that scores the teacher on every
    batch. Both autocast to `precision`, keep the data on the device, crop and flip there in
    batches and use channels_last: the difference is the cache. Its one-off build is reported
    apart (the recipe's 240 epochs amortise it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (n,), generator=g).to(device)
    x_val, y_val = x[: n // 10], y[: n // 10]
    folder = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    teacher = build_model(teacher_cfg, (3, 32, 32), 100)
    files = [Path(folder.name) / "member_0.pt"]
    torch.save(checkpoint(teacher, teacher_cfg, (3, 32, 32), 100), files[0])
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    start = time.perf_counter()
    cached = bench_view_cache(folder.name, files, x, 100, views, 1024, device).to(device)
    cache_seconds = time.perf_counter() - start
    amp = autocast(device, precision)

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(student_cfg, (3, 32, 32), 100).to(device)

    def ours() -> float:
        def loss_fn(out: torch.Tensor, b: Any) -> torch.Tensor:
            targets = combine(cached.member_logits(b), "arithmetic", T)
            return distillation_loss(out, targets, y[b.idx], T, ALPHA)

        settings = TrainSettings(
            SGD, epochs=epochs, batch_size=64, augment=views, precision=precision,
            channels_last=True, checkpoint_every=math.inf,
        )  # fmt: skip
        _sync(device)
        begin = time.perf_counter()
        fit(student(), x, loss_fn, settings, x_val=x_val, y_val=y_val)
        _sync(device)
        return time.perf_counter() - begin

    def reference() -> float:
        model = student().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        _sync(device)
        begin = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, 64):
                idx = perm[i : i + 64]
                view = torch.randint(0, views.count, (len(idx),), generator=gen)
                xb = views.apply(x[idx], view).contiguous(memory_format=torch.channels_last)
                with amp:
                    with torch.no_grad():
                        log_p = combine(teacher(xb)[None].float(), "arithmetic", T)
                    out = model(xb).float()
                loss = distillation_loss(out, log_p, y[idx], T, ALPHA)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            predict(model, x_val, 1024, precision)  # the validation pass fit makes each epoch
        _sync(device)
        return time.perf_counter() - begin

    try:
        ours_s, ref_s = best_of(repeats, ours, reference)
    finally:
        folder.cleanup()
    return {
        "cifar_kd_speedup": ref_s / ours_s,
        "cifar_kd_samples_per_s": epochs * n / ours_s,
        "cifar_kd_reference_samples_per_s": epochs * n / ref_s,
        "cifar_kd_cache_seconds": cache_seconds,
        "cifar_kd_setup": f"{pair}, {n} images x {epochs} epochs, batch 64, {views.count} "
        f"views, {precision} on {device}",
    }


def cifar_kd(quick: bool) -> dict[str, Any]:
    """cifar_kd_throughput on a CUDA GPU in bf16; elsewhere a line saying why it is skipped
    (on 2 CPU cores the view cache alone would take hours)."""
    if not torch.cuda.is_available():
        print("bench: no CUDA GPU here, so the resnet8x4 KD throughput (cifar_kd_*) is skipped")
        return {"cifar_kd": "skipped: measured on a CUDA GPU only"}
    n = 5000 if quick else 20000
    return cifar_kd_throughput(torch.device("cuda"), "bf16", n, 2, 2 if quick else 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(x, y, epochs: int, repeats: int) -> dict[str, float]:
    """Samples/s of distillrun's loop over the hand-written one, same student, data, batch."""
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    logits = torch.randn(5, len(x_tr), 10, generator=torch.Generator().manual_seed(1)) * 3
    soft = combine(logits, "arithmetic", T)  # the reference: targets precomputed once
    cached = CachedLogits({"logits": logits}, 10)

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (1, 28, 28), 10)

    ours, ref = best_of(
        repeats,
        lambda: distillrun_epochs(student(), x_tr, y_tr, cached, epochs, x_val, y_val),
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
    teachers = [build_model(TEACHER, (1, 28, 28), 10).eval() for _ in range(members)]
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (1, 28, 28), 10)

    def reference() -> float:
        return sum(
            reference_epochs(student(), x_tr, y_tr, None, epochs, teachers) for _ in range(jobs)
        )

    def ours() -> float:
        start = time.perf_counter()
        logits = torch.stack([predict(t, torch.cat([x_tr, x_val])) for t in teachers])
        seconds = time.perf_counter() - start
        cached = CachedLogits({"logits": logits[:, : len(x_tr)]}, 10)
        return seconds + sum(
            distillrun_epochs(student(), x_tr, y_tr, cached, epochs, x_val, y_val)
            for _ in range(jobs)
        )

    ours_s, ref_s = best_of(2, ours, reference)
    return {
        "sweep_speedup": ref_s / ours_s,
        "sweep_seconds": ours_s,
        "sweep_reference_seconds": ref_s,
    }


def augmented_sweep_speedup(x, y, jobs: int, epochs: int, members: int) -> dict[str, float]:
    """An 8-job sweep on shifted views (SHIFT: 9 views) with 5 CNN teachers: the reference runs
    the teachers on every batch's views (online); distillrun scores every view once into the
    view cache (that time counted, teacher checkpoints loaded from disk as in a run), and every
    job reads it."""
    torch.manual_seed(0)
    teachers = [build_model(CNN_TEACHER, (1, 28, 28), 10).eval() for _ in range(members)]
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    folder = tempfile.TemporaryDirectory()
    files = [Path(folder.name) / f"member_{i}.pt" for i in range(members)]
    for f, t in zip(files, teachers, strict=True):
        torch.save(checkpoint(t, CNN_TEACHER, (1, 28, 28), 10), f)

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (1, 28, 28), 10)

    def reference() -> float:
        return sum(
            reference_epochs(student(), x_tr, y_tr, None, epochs, teachers, SHIFT)
            for _ in range(jobs)
        )

    def ours() -> float:
        for old in Path(folder.name).glob("view-cache/*.pt"):
            old.unlink()  # every repeat builds the cache anew
        start = time.perf_counter()
        cached = bench_view_cache(folder.name, files, x_tr, 10, SHIFT, 256, torch.device("cpu"))
        seconds = time.perf_counter() - start
        return seconds + sum(
            distillrun_epochs(student(), x_tr, y_tr, cached, epochs, x_val, y_val, SHIFT)
            for _ in range(jobs)
        )

    ours_s, ref_s = best_of(2, ours, reference)
    folder.cleanup()
    return {
        "augmented_sweep_speedup": ref_s / ours_s,
        "augmented_sweep_seconds": ours_s,
        "augmented_sweep_reference_seconds": ref_s,
        "augmented_sweep_setup": f"{jobs} jobs x {epochs} epochs, {len(x_tr)} examples, "
        f"{SHIFT.count} views, {members} CNN teachers",
    }


def views_throughput(x, y, epochs: int, repeats: int) -> dict[str, float]:
    """Samples/s of a distill epoch on cached views (a random shifted view of each image and
    the members' logits on that view, CachedLogits [M, N, V, C] in fp16) over the same epoch
    without augmentation (logits [M, N, C])."""
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    g = torch.Generator().manual_seed(1)
    plain = CachedLogits({"logits": torch.randn(5, len(x_tr), 10, generator=g) * 3}, 10)
    on_views = torch.randn(5, len(x_tr), SHIFT.count, 10, generator=g) * 3
    views = CachedLogits({"logits": on_views.half()}, 10)

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (1, 28, 28), 10)

    with_views, without = best_of(
        repeats,
        lambda: distillrun_epochs(student(), x_tr, y_tr, views, epochs, x_val, y_val, SHIFT),
        lambda: distillrun_epochs(student(), x_tr, y_tr, plain, epochs, x_val, y_val),
    )
    return {
        "views_throughput_ratio": without / with_views,
        "views_samples_per_s": epochs * len(x_tr) / with_views,
    }


def distill_loss_of(
    loss: str, standardize: bool, cached: CachedLogits, y: torch.Tensor
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """distill's loss function (stages.distill.distill_loss_fn) for `loss=<loss>` with its
    defaults from conf/loss/<loss>.yaml, at T and ALPHA, on the cached teacher outputs."""
    from omegaconf import OmegaConf

    from distillrun.config import yaml_file
    from distillrun.stages.distill import distill_loss_fn

    settings = {**yaml_file("loss", loss), "standardize": standardize}
    cfg = OmegaConf.create({"loss": settings, "T": T, "ensemble": "arithmetic"})
    return distill_loss_fn(cfg, cached, y, 10, ALPHA)


def loss_throughput(x, y, epochs: int, repeats: int) -> dict[str, Any]:
    """Samples/s of a distill epoch on cached views (a random shifted view of each image and the
    five members' logits on that view, as views_throughput) with each loss of LOSS_VARIANTS,
    through distill's own loss function: the same student, views, batches and cache for every
    loss, run in alternation. Each loss's ratio is kd's time over its own (1: as fast as kd)."""
    n_val = len(x) // 10
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    g = torch.Generator().manual_seed(1)
    on_views = torch.randn(5, len(x_tr), SHIFT.count, 10, generator=g) * 3
    cached = CachedLogits({"logits": on_views.half()}, 10)

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, (1, 28, 28), 10)

    def timed(loss: str, standardize: bool) -> Callable[[], float]:
        loss_fn = distill_loss_of(loss, standardize, cached, y_tr)
        return lambda: distillrun_epochs(
            student(), x_tr, y_tr, cached, epochs, x_val, y_val, SHIFT, loss_fn
        )

    runs = [timed(*variant) for variant in LOSS_VARIANTS.values()]
    runs[0]()  # a warm-up, untimed: the first epoch in a process pays for allocations
    times = best_of(repeats, *runs)
    seconds = dict(zip(LOSS_VARIANTS, times, strict=True))
    samples = epochs * len(x_tr)
    figures: dict[str, Any] = {
        f"loss_samples_per_s_{name}": samples / s for name, s in seconds.items()
    }
    figures |= {
        f"loss_throughput_ratio_{name}": seconds["kd"] / s
        for name, s in seconds.items()
        if name != "kd"
    }
    figures["loss_throughput_setup"] = (
        f"{len(x_tr)} examples x {epochs} epochs, {SHIFT.count} cached views, 5 members, "
        f"800x800 MLP student, batch {BATCH}, best of {repeats}"
    )
    return figures


def kl_inference(classes: int, specialists: int, n: int, repeats: int = 3) -> float:
    """Test examples per second of the generalist-plus-specialists KL combination: each
    specialist covers classes / specialists classes plus a dustbin, the generalist's top
    class picks the active ones (evaluate's defaults)."""
    from distillrun.method.combination import active_specialists, combine_kl

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
        teachers = [build_model(TEACHER, (1, 28, 28), 10).eval() for _ in range(n)]
        start = time.perf_counter()
        cached = CachedLogits({"logits": torch.stack([predict(t, x) for t in teachers])}, 10)
        cache = time.perf_counter() - start
        torch.manual_seed(0)
        student = build_model(STUDENT, (1, 28, 28), 10)
        ours = distillrun_epochs(student, x, y, cached, 1, x_val, y_val)
        torch.manual_seed(0)
        ref = reference_epochs(build_model(STUDENT, (1, 28, 28), 10), x, y, None, 1, teachers)
        out[f"epoch_seconds_teachers_{n}"] = ours
        out[f"cache_seconds_teachers_{n}"] = cache
        out[f"reference_epoch_seconds_teachers_{n}"] = ref
    return out


def command_seconds(args: list[str], env: dict[str, str] | None = None, repeats: int = 5) -> float:
    """The median wall time of the installed `distillrun <args>`, in a fresh process each time."""
    command = [str(Path(sys.executable).parent / "distillrun"), *args]
    times = []
    with tempfile.TemporaryDirectory() as cwd:  # nothing of the caller's folder is read
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(
                command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, check=True
            )
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def command_figures(repeats: int = 5) -> dict[str, float]:
    """What a user waits for before any work starts: help, a config, a Tab of completion."""
    return {
        "help_seconds": command_seconds(["--help"], repeats=repeats),
        "stage_help_seconds": command_seconds(["distill", "--help"], repeats=repeats),
        "cfg_job_seconds": command_seconds(["distill", "T=2", "--cfg", "job"], repeats=repeats),
        "tab_seconds": command_seconds(
            ["-sc", "query=bash"], {"COMP_LINE": "distillrun distill train."}, repeats
        ),
    }


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
    parser.add_argument(
        "--only",
        choices=["losses", "commands"],
        help="measure these figures alone (losses: loss_throughput; commands: the seconds of "
        "--help, --cfg job and a Tab)",
    )
    parser.add_argument("--out", default="outputs/bench.json")
    parser.add_argument(
        "--mnist", default=os.environ.get("DISTILLRUN_DATA", "../shared/data/mnist")
    )
    args = parser.parse_args(argv)

    quick = args.quick
    if args.only == "commands":
        report(command_figures(), Path(args.out))
        return
    x, y = mnist_like(args.mnist, 6000 if quick else 60000)
    figures: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    n_losses = 6000 if quick else 20000
    losses = {"epochs": 1, "repeats": 2 if quick else 3}
    if args.only == "losses":
        report(figures | loss_throughput(x[:n_losses], y, **losses), Path(args.out))
        return
    figures["matmul_gflops"] = matmul_gflops()
    figures |= train_throughput(x, y, epochs=1 if quick else 2, repeats=2 if quick else 3)
    figures["matmul_fraction"] = figures["train_gflops"] / figures["matmul_gflops"]
    figures["reference_matmul_fraction"] = figures["reference_gflops"] / figures["matmul_gflops"]
    figures |= sweep_speedup(x[:2000] if quick else x[:10000], y, jobs=8, epochs=2, members=5)
    figures |= augmented_sweep_speedup(
        x[:500] if quick else x[:1111], y, jobs=8, epochs=2 if quick else 10, members=5
    )
    figures |= views_throughput(x, y, epochs=1 if quick else 2, repeats=2 if quick else 3)
    figures |= loss_throughput(x[:n_losses], y, **losses)
    figures["kl_inference_examples_per_s"] = kl_inference(100, 10, 2000 if quick else 10000)
    for classes in (20, 100, 1000):  # how evaluate's inference grows: specialists of 10 classes
        figures[f"kl_inference_examples_per_s_{classes}_classes"] = kl_inference(
            classes, classes // 10, 2000
        )
    figures |= teachers_scaling(x[:2000], y[:2000], [1, 5, 10])
    figures |= cifar_kd(quick)
    figures |= command_figures()
    figures |= peak_rss_mb(None if quick else args.mnist)
    report(figures, Path(args.out))


def report(figures: dict[str, Any], out: Path) -> None:
    from distillrun.console import results_table
    from distillrun.runs.artifacts import write_json

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
