"""`distillrun distill`: a student trained on a teachers run's soft targets.

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)      (alpha weights soft)

The teachers' logits on the transfer set come from the teachers run's cache (logits.pt), looked
up by example index: no teacher forward pass here. The student is evaluated at T = 1. With
`baseline=true` the same student (same initialisation, same transfer set) is also trained on
the hard labels alone (alpha = 0), so every run shows what distillation bought.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distillrun import artifacts
from distillrun.console import results_table, say
from distillrun.data import Data, load_dataset
from distillrun.ensemble import combine
from distillrun.errors import UserError
from distillrun.losses import distillation_loss, logit_matching_loss
from distillrun.models import build_model, checkpoint, count_parameters, output_layer
from distillrun.stage import Run, run_stage, train_one
from distillrun.train import agreement, classification_metrics, predict

TEACHERS_STAGE = "train-teachers"
# An evaluate run writes the generalist-plus-specialists distribution in the same logits.pt
# format (one member), so it can be distilled like any teacher.
COMBINATION_STAGE = "evaluate"


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="distill")
def main(cfg: DictConfig) -> float | None:
    return run_stage("distill", cfg, distill)


def find_teachers(cfg: DictConfig, data: Data) -> tuple[Path, dict[str, Any]]:
    """The teachers run named by `teachers=`, or the newest complete one on the same data."""

    def same_data(manifest: dict[str, Any]) -> str | None:
        theirs = manifest.get("dataset", {})
        if theirs.get("fingerprint") == data.fingerprint:
            return None
        return (
            f"{manifest.get('run_dir')} was trained on dataset={theirs.get('name')} with other "
            f"data or splits than this run's dataset={data.name} (the dataset fingerprint differs)"
        )

    if cfg.teachers is None:
        folder, manifest = artifacts.newest_complete_run(
            Path(cfg.paths.output_root), TEACHERS_STAGE, same_data, say
        )
    else:
        folder = Path(str(cfg.teachers))
        stage = (artifacts.read_manifest(folder) or {}).get("stage") if folder.is_dir() else None
        manifest = artifacts.complete_run(
            folder, COMBINATION_STAGE if stage == COMBINATION_STAGE else TEACHERS_STAGE
        )
        why_not = same_data(manifest)
        if why_not:
            raise UserError(
                f"{why_not}: pass the dataset settings the teachers used, or a teachers run "
                "trained on this dataset"
            )
    return folder.resolve(), manifest


def load_teacher_logits(folder: Path, data: Data) -> dict[str, torch.Tensor]:
    cache = artifacts.load_tensors(folder / "logits.pt")
    ok = isinstance(cache, dict) and cache.get("fingerprint") == data.fingerprint
    for split in ("train", "val", "test"):
        t = cache.get(split) if ok else None
        ok = ok and isinstance(t, torch.Tensor) and t.dim() == 3
        ok = ok and t.shape[1:] == (len(getattr(data, f"y_{split}")), data.num_classes)
    if not ok:
        raise UserError(
            f"{folder / 'logits.pt'} does not hold teacher logits for this dataset's splits: "
            "the teachers run is damaged; re-run `distillrun train-teachers`"
        )
    return cache


def transfer_indices(y_train: torch.Tensor, cfg: DictConfig, seed: int) -> torch.Tensor:
    """Indices into the training split: a `fraction` of it, without the omitted classes."""
    idx = torch.arange(len(y_train))
    fraction = cfg.transfer.fraction
    if fraction < 1:
        g = torch.Generator().manual_seed(seed)
        keep = max(1, round(fraction * len(idx)))
        idx = torch.randperm(len(idx), generator=g)[:keep].sort().values
    omit = list(cfg.transfer.omit_classes)
    if omit:
        idx = idx[~torch.isin(y_train[idx], torch.tensor(omit))]
    if len(idx) == 0:
        raise UserError("the transfer set is empty: raise transfer.fraction or omit fewer classes")
    return idx


def fit_omit_bias(logits: torch.Tensor, y: torch.Tensor, omit: list[int]) -> float:
    """The bias for the omitted classes with the fewest errors (then lowest NLL) on these data."""
    best_key, best_bias = None, 0.0
    for step in range(0, 201):
        bias = step / 10
        shifted = logits.clone()
        shifted[:, omit] += bias
        m = classification_metrics(shifted, y, "val")
        key = (m["val_errors"], m["val_nll"])
        if best_key is None or key < best_key:
            best_key, best_bias = key, bias
    return best_bias


def errors_on(logits: torch.Tensor, y: torch.Tensor, classes: list[int]) -> int:
    mask = torch.isin(y, torch.tensor(classes, device=y.device))
    return int((logits[mask].argmax(dim=1) != y[mask]).sum())


def distill(cfg: DictConfig, run: Run) -> dict[str, Any]:
    data = load_dataset(cfg.dataset)
    omit = list(cfg.transfer.omit_classes)
    bad = [c for c in omit if c >= data.num_classes]
    if bad:
        raise UserError(
            f"transfer.omit_classes has class ids {bad} out of range: dataset={data.name} has "
            f"classes 0..{data.num_classes - 1}"
        )
    folder, teachers = find_teachers(cfg, data)
    run.inputs["teachers"] = str(folder)
    cache = load_teacher_logits(folder, data)
    data = data.to(run.device)
    device = run.device

    T, labels = float(cfg.T), bool(cfg.transfer.labels)
    alpha = float(cfg.alpha) if labels else 1.0
    idx = transfer_indices(data.y_train.cpu(), cfg, cfg.seed).to(device)
    x, y = data.x_train[idx], data.y_train[idx]
    teacher_train = cache["train"].to(device)[:, idx]  # [members, transfer examples, C]
    y_hard = y if labels else None
    if cfg.loss == "kd":
        targets = combine(teacher_train, cfg.ensemble, T)

        def loss_fn(out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return distillation_loss(
                out, targets[b], None if y_hard is None else y_hard[b], T, alpha
            )
    else:
        # The ensemble's log-probabilities are logits of its distribution (any other logits
        # differ by a per-example shift, which logit matching removes by zero-meaning).
        targets = combine(teacher_train, cfg.ensemble, 1.0)

        def loss_fn(out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return logit_matching_loss(
                out, targets[b], None if y_hard is None else y_hard[b], alpha
            )

    say(
        f"distill: teachers {folder}\n"
        f"  student {cfg.model.name} on {len(idx)} transfer examples of {data.name}, "
        f"loss={cfg.loss} T={T:g} alpha={alpha:g} ensemble={cfg.ensemble}"
        + ("" if labels else " (unlabeled transfer set: soft term only)")
        + (f", without classes {omit}" if omit else "")
        + f", on {device} -> {run.dir}"
    )
    run.info["dataset"] = teachers.get("dataset", {})
    run.info["transfer_size"] = len(idx)

    teacher_test = combine(cache["test"], cfg.ensemble).to(device)
    y_test, y_val = data.y_test, data.y_val

    def train_student(label: str, fn: Any) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(cfg.seed)  # the same initialisation for student and baseline
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        fitted = train_one(run, cfg, label, model, x, fn, data.x_val, y_val, cfg.seed)
        artifacts.save_tensors(
            run.dir / f"{label.replace(' ', '_')}.pt",
            checkpoint(model, cfg.model, data.input_shape, data.num_classes),
        )
        return model, fitted

    def report(model: torch.nn.Module) -> dict[str, Any]:
        test_logits = predict(model, data.x_test, cfg.train.eval_batch_size)
        out = {
            **classification_metrics(
                predict(model, data.x_val, cfg.train.eval_batch_size), y_val, "val"
            ),
            **classification_metrics(test_logits, y_test, "test"),
            "teacher_agreement": agreement(test_logits, teacher_test),
        }
        if omit:
            out["test_errors_on_omitted"] = errors_on(test_logits, y_test, omit)
        return out

    baseline: dict[str, Any] = {}
    if cfg.baseline and not (labels and alpha == 0):
        base_model, base_fit = train_student("baseline", lambda out, b: F.cross_entropy(out, y[b]))
        baseline = {**report(base_model), "best_epoch": base_fit.best_epoch}
        say(f"  hard-label student: {baseline['test_errors']} test errors")

    student, fitted = train_student("student", loss_fn)
    metrics: dict[str, Any] = {**report(student), "best_epoch": fitted.best_epoch}
    metrics["minutes"] = fitted.seconds / 60
    if omit:
        val_logits = predict(student, data.x_val, cfg.train.eval_batch_size)
        bias = (
            fit_omit_bias(val_logits, y_val, omit)
            if cfg.transfer.fit_omit_bias
            else float(cfg.transfer.omit_bias)
        )
        uncorrected = {f"uncorrected_{k}": v for k, v in metrics.items() if k.startswith("test_")}
        if bias:
            with torch.no_grad():
                output_layer(student).bias[omit] += bias
            artifacts.save_tensors(
                run.dir / "student.pt",
                checkpoint(student, cfg.model, data.input_shape, data.num_classes),
            )
            metrics.update(report(student))
        metrics.update(uncorrected, omit_bias=bias)

    teacher_metrics = classification_metrics(teacher_test, y_test, "test")
    student_params = count_parameters(student)
    teacher_params = teachers.get("metrics", {}).get("teacher_params")
    metrics.update(
        teacher_test_accuracy=teacher_metrics["test_accuracy"],
        teacher_test_errors=teacher_metrics["test_errors"],
        student_params=student_params,
        teacher_params=teacher_params,
        **{f"baseline_{k}": v for k, v in baseline.items()},
    )
    _print_table(cfg, data, teachers, teacher_metrics, baseline, metrics, alpha)
    return metrics


def _print_table(
    cfg: DictConfig,
    data: Data,
    teachers: dict[str, Any],
    teacher_metrics: dict[str, Any],
    baseline: dict[str, Any],
    student: dict[str, Any],
    alpha: float,
) -> None:
    rows: list[list[Any]] = [
        [f"teacher {i} (seed {m.get('seed')})", m.get("test_accuracy"), m.get("test_errors")]
        + [m.get("test_nll"), m.get("test_ece"), None]
        for i, m in enumerate(teachers.get("metrics", {}).get("members", []))
    ]
    rows.append(
        [f"teacher ensemble ({cfg.ensemble})", teacher_metrics["test_accuracy"]]
        + [
            teacher_metrics["test_errors"],
            teacher_metrics["test_nll"],
            teacher_metrics["test_ece"],
            1.0,
        ]
    )
    hard = "student, hard labels (alpha=0)"
    if not cfg.transfer.labels:
        hard = "student, hard labels (the labels distill did not use)"
    for label, m in (
        (hard, baseline),
        (f"student, distilled (T={cfg.T:g}, alpha={alpha:g})", student),
    ):
        if m:
            rows.append(
                [label, m["test_accuracy"], m["test_errors"], m["test_nll"], m["test_ece"]]
                + [m["teacher_agreement"]]
            )
    if "omit_bias" in student:
        rows.append(
            [
                f"  before the bias correction (+{student['omit_bias']:g})",
                student["uncorrected_test_accuracy"],
                student["uncorrected_test_errors"],
                student["uncorrected_test_nll"],
                student["uncorrected_test_ece"],
                None,
            ]
        )
    results_table(
        f"distill on {data.name}: {len(data.y_test)} test examples",
        ["model", "test accuracy", "test errors", "test NLL", "ECE", "agrees with teachers"],
        rows,
    )
