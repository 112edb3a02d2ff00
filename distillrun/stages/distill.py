"""`distillrun distill`: a student trained on a teachers run's soft targets.

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)      (alpha weights soft)

(`loss=dkd`, `dist`, `nkd`, `logit_mse`: another term in place of T^2 * KL, method/losses.py.)

The teachers' logits on the transfer set come from the teachers' cache
(runs/teacher_runs.py), looked up by example index, or with `augment=` from a view cache of every
(example, view) or from the member checkpoints run on each batch (method/teacher_outputs.py). The
student is evaluated at T = 1. With `baseline=true` the same student (same initialisation, same
transfer set) is also trained on the hard labels alone (alpha = 0), so every run shows what
distillation bought.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from distillrun import choices
from distillrun.choices import one_of
from distillrun.config import (
    Problems,
    check_augment,
    check_common,
    check_loss,
    check_teacher_outputs,
    folder_list,
    in_range,
    is_int,
    is_num,
)
from distillrun.console import results_table, say
from distillrun.core.data import Data, load_dataset
from distillrun.core.inference_speed import best_seconds, machine, recorded_speed, timed_inputs
from distillrun.core.models import (
    build_model,
    checkpoint,
    count_parameters,
    load_model,
    output_layer,
)
from distillrun.core.train import Fit, predict
from distillrun.errors import UserError
from distillrun.method import augment
from distillrun.method.augment import Augmentation, Batch
from distillrun.method.ensemble import combine
from distillrun.method.losses import LOSSES, Teacher, describe, hyperparameters, standardize
from distillrun.method.metrics import agreement, classification_metrics
from distillrun.method.teacher_outputs import CachedLogits, OnlineTeachers, load_members, view_cache
from distillrun.runs import artifacts
from distillrun.runs.teacher_runs import Teachers, choose_teachers
from distillrun.stages.common import Run, resolve_teachers, run_stage, train_one, train_settings
from distillrun.stages.train_teachers import hard_label_loss


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="distill")
def main(cfg: DictConfig) -> float | None:
    return run_stage("distill", cfg, distill)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    check_common(cfg, p)
    check_augment(cfg, p)
    check_teacher_outputs(cfg, p)
    p.need(
        cfg.teachers is None or folder_list(cfg.teachers) is not None,
        f"teachers={cfg.teachers} must be a run or sweep folder, or a list of them",
    )
    p.need(
        in_range(cfg.T, 0, math.inf, lo_open=True),
        f"T={cfg.T} must be a finite number > 0 (the paper used 1 to 20)",
    )
    p.need(
        in_range(cfg.alpha, 0, 1),
        f"alpha={cfg.alpha} must be in [0, 1] (the weight of the soft term)",
    )
    p.need(
        cfg.ensemble in choices.ENSEMBLES,
        f"ensemble={cfg.ensemble}: use {one_of(choices.ENSEMBLES)}",
    )
    check_loss(cfg, p)
    p.need(isinstance(cfg.baseline, bool), f"baseline={cfg.baseline}: use true or false")
    t = cfg.transfer
    p.need(
        in_range(t.fraction, 0, 1, lo_open=True),
        f"transfer.fraction={t.fraction} must be in (0, 1]",
    )
    p.need(isinstance(t.labels, bool), f"transfer.labels={t.labels}: use true or false")
    omit = list(t.omit_classes) if OmegaConf.is_list(t.omit_classes) else None
    p.need(
        omit is not None and all(is_int(c) and c >= 0 for c in omit),
        f"transfer.omit_classes={t.omit_classes} must be a list of class ids, e.g. [3]",
    )
    p.need(is_num(t.omit_bias), f"transfer.omit_bias={t.omit_bias} must be a number")
    p.need(isinstance(t.fit_omit_bias, bool), "transfer.fit_omit_bias: use true or false")
    if t.fit_omit_bias and cfg.dataset.val_fraction == 0:
        p.append(
            "transfer.fit_omit_bias=true needs a validation split: set dataset.val_fraction > 0"
        )


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


def transfer_set(data: Data, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transfer set's inputs and labels: the training split itself when `idx` is all of
    it (no copy of what may be hundreds of MB)."""
    if len(idx) == len(data.y_train):  # sorted and without repeats: every example, in order
        return data.x_train, data.y_train
    return data.x_train[idx], data.y_train[idx]


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
    """Train a student on the teachers' soft targets and, with `baseline=true`, the same
    student on the hard labels alone; score both.

    Consumes a train-teachers, import-teachers or evaluate run, or a sweep or list of them
    (`teachers=`, by default the newest): their logits.pt and, with `augment=`, their member
    checkpoints (a view cache beside the teachers, or run online). Writes student.pt,
    baseline.pt, metrics.jsonl, and as metrics the students' and the teachers' test scores and
    what the student saves.
    """
    data = load_dataset(cfg.dataset)
    omit = omitted_classes(cfg, data)
    output_root, ensemble = Path(cfg.paths.output_root), cfg.ensemble
    chosen = resolve_teachers(
        run,
        "teachers",
        cfg.teachers,
        lambda named, note: choose_teachers(named, output_root, data, ensemble, note),
        data,
    )
    teachers, cache = chosen.teachers, chosen.logits
    run.info["teacher_cache"] = {"path": str(chosen.logits_file), "built_by_this_run": chosen.built}
    augmentation = augment.from_config(cfg.augment, data.image_shape, data.normalization)
    data = data.to(run.device)
    labels = bool(cfg.transfer.labels)
    alpha = float(cfg.alpha) if labels else 1.0
    idx = transfer_indices(data.y_train.cpu(), cfg, cfg.seed).to(run.device)
    x, y = transfer_set(data, idx)
    say(plan(cfg, run, data, len(idx), augmentation, alpha))
    augmentation, teacher = teacher_outputs(cfg, run, teachers, data, idx, augmentation, cache)
    run.info["dataset"] = teachers.dataset
    run.info["transfer_size"] = len(idx)
    teacher_test = combine(cache["test"], ensemble).to(run.device)
    baseline: dict[str, Any] = {}
    if cfg.baseline and not (labels and alpha == 0):
        baseline = train_baseline(run, cfg, data, x, y, augmentation, teacher_test, omit)
    loss_fn = distill_loss_fn(cfg, teacher, y if labels else None, data.num_classes, alpha)
    student, fitted = train_student(run, cfg, data, x, augmentation, "student", loss_fn)
    metrics = scores(student, data, teacher_test, omit, cfg.train.eval_batch_size)
    metrics.update(best_epoch=fitted.best_epoch, minutes=fitted.seconds / 60)
    if omit:
        correct_omitted_classes(run, cfg, data, student, metrics, teacher_test, omit)
    teacher_metrics = classification_metrics(teacher_test, data.y_test, "test")
    metrics.update(
        teacher_test_accuracy=teacher_metrics["test_accuracy"],
        teacher_test_errors=teacher_metrics["test_errors"],
        student_params=count_parameters(student),
        teacher_params=teachers.params,
        **inference_cost(run, teachers, student, data.x_test, cfg.train.eval_batch_size),
        **{f"baseline_{k}": v for k, v in baseline.items()},
    )
    _print_table(cfg, data, teachers, teacher_metrics, baseline, metrics, alpha)
    say(savings(metrics))
    return metrics


def omitted_classes(cfg: DictConfig, data: Data) -> list[int]:
    """`transfer.omit_classes`, checked against the dataset's classes."""
    omit = list(cfg.transfer.omit_classes)
    bad = [c for c in omit if c >= data.num_classes]
    if bad:
        raise UserError(
            f"transfer.omit_classes has class ids {bad} out of range: dataset={data.name} has "
            f"classes 0..{data.num_classes - 1}"
        )
    return omit


def plan(
    cfg: DictConfig,
    run: Run,
    data: Data,
    transfer_size: int,
    augmentation: Augmentation | None,
    alpha: float,
) -> str:
    """The line after the first: the student's training."""
    omit, labels = list(cfg.transfer.omit_classes), bool(cfg.transfer.labels)
    return (
        f"  student {cfg.model.name} on {transfer_size} transfer examples of {data.name}"
        + (f" ({augmentation.describe()})" if augmentation else "")
        + f", loss={describe(cfg.loss)} T={float(cfg.T):g} alpha={alpha:g}"
        + f" ensemble={cfg.ensemble}"
        + ("" if labels else " (unlabeled transfer set: soft term only)")
        + (f", without classes {omit}" if omit else "")
        + f", on {run.device} -> {run.dir}"
    )


def distill_loss(
    out: torch.Tensor,
    b: Batch,
    *,
    teacher: CachedLogits | OnlineTeachers,
    term: Callable[..., torch.Tensor],
    hyperparameters: dict[str, Any],
    standardized: bool,
    ensemble: str,
    T: float,
    alpha: float,
    y_hard: torch.Tensor | None,
    classes: int,
) -> torch.Tensor:
    """The student's loss on batch `b`: alpha * term + (1 - alpha) * CE(y, q_1), the term against
    the teacher ensemble's outputs on exactly the batch's examples and views (losses.LOSSES);
    without `y_hard` (an unlabeled transfer set) the term alone, its target class the teachers'
    most likely one. With `standardized`, the term sees standardised logits (each member's,
    then combined) and the cross-entropy the raw ones."""
    members = teacher.member_logits(b)
    z = out
    if standardized:
        members, z = standardize(members), standardize(out)
    ensemble_out = Teacher(members, ensemble)
    labels = None if y_hard is None else b.labels(y_hard, classes)
    target = ensemble_out.log_probs(1.0).argmax(dim=1) if labels is None else labels
    distilled = term(z, ensemble_out, target, T, b.epoch, **hyperparameters)
    if labels is None:
        return distilled
    return alpha * distilled + (1 - alpha) * F.cross_entropy(out, labels)


def distill_loss_fn(
    cfg: DictConfig,
    teacher: CachedLogits | OnlineTeachers,
    y_hard: torch.Tensor | None,
    classes: int,
    alpha: float,
) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    """`distill_loss` with this run's settings (`loss=`, T, alpha, ensemble)."""
    return partial(
        distill_loss,
        teacher=teacher,
        term=LOSSES[cfg.loss.name],
        hyperparameters=hyperparameters(cfg.loss),
        standardized=bool(cfg.loss.standardize),
        ensemble=cfg.ensemble,
        T=float(cfg.T),
        alpha=alpha,
        y_hard=y_hard,
        classes=classes,
    )


def train_student(
    run: Run,
    cfg: DictConfig,
    data: Data,
    x: torch.Tensor,
    augmentation: Augmentation | None,
    label: str,
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
) -> tuple[torch.nn.Module, Fit]:
    """A student `label` trained on the transfer set `x` with `loss_fn`, selected on the
    validation split; saved as <label>.pt. Student and baseline start from the same weights."""
    torch.manual_seed(cfg.seed)  # the same initialisation for student and baseline
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(run.device)
    settings = train_settings(cfg, cfg.seed, augment=augmentation)
    fitted = train_one(run, cfg, label, model, x, loss_fn, data.x_val, data.y_val, settings)
    artifacts.save_tensors(
        run.dir / f"{label.replace(' ', '_')}.pt",
        checkpoint(model, cfg.model, data.input_shape, data.num_classes),
    )
    return model, fitted


def train_baseline(
    run: Run,
    cfg: DictConfig,
    data: Data,
    x: torch.Tensor,
    y: torch.Tensor,
    augmentation: Augmentation | None,
    teacher_test: torch.Tensor,
    omit: list[int],
) -> dict[str, Any]:
    """The hard-label student (alpha = 0) on the same transfer set: its scores."""
    loss_fn = partial(hard_label_loss, y=y, classes=data.num_classes)
    model, fitted = train_student(run, cfg, data, x, augmentation, "baseline", loss_fn)
    baseline = {
        **scores(model, data, teacher_test, omit, cfg.train.eval_batch_size),
        "best_epoch": fitted.best_epoch,
    }
    say(f"  hard-label student: {baseline['test_errors']} test errors")
    return baseline


def scores(
    model: torch.nn.Module,
    data: Data,
    teacher_test: torch.Tensor,
    omit: list[int],
    batch_size: int,
) -> dict[str, Any]:
    """A student's validation and test metrics, its agreement with the teachers on the test
    set, and its test errors on the omitted classes."""
    test_logits = predict(model, data.x_test, batch_size)
    out = {
        **classification_metrics(predict(model, data.x_val, batch_size), data.y_val, "val"),
        **classification_metrics(test_logits, data.y_test, "test"),
        "teacher_agreement": agreement(test_logits, teacher_test),
    }
    if omit:
        out["test_errors_on_omitted"] = errors_on(test_logits, data.y_test, omit)
    return out


def correct_omitted_classes(
    run: Run,
    cfg: DictConfig,
    data: Data,
    student: torch.nn.Module,
    metrics: dict[str, Any],
    teacher_test: torch.Tensor,
    omit: list[int],
) -> None:
    """Raise the omitted classes' output bias (`transfer.omit_bias`, or fitted on the
    validation split), save the corrected student.pt and score it: `metrics` gets the new
    scores, the uncorrected ones (`uncorrected_*`) and `omit_bias`."""
    batch_size = cfg.train.eval_batch_size
    val_logits = predict(student, data.x_val, batch_size)
    bias = (
        fit_omit_bias(val_logits, data.y_val, omit)
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
        metrics.update(scores(student, data, teacher_test, omit, batch_size))
    metrics.update(uncorrected, omit_bias=bias)


def teacher_outputs(
    cfg: DictConfig,
    run: Run,
    teachers: Teachers,
    data: Data,
    idx: torch.Tensor,
    augmentation: Augmentation | None,
    cache: dict[str, torch.Tensor],
) -> tuple[Augmentation | None, CachedLogits | OnlineTeachers]:
    """Where the student's teacher outputs come from (`teacher_outputs=`), and the augmentation
    it trains on (with `views_per_example`, a subset of the views)."""
    t = cfg.teacher_outputs
    mode = t.mode
    if mode == "auto":
        continuous = augmentation is not None and augmentation.count is None
        mode = "online" if continuous else "cached"
    record: dict[str, Any] = {"mode": mode}
    if augmentation is not None:
        record["augment"] = augmentation.describe()
    run.info["teacher_outputs"] = record
    if mode == "online":
        what = "teacher_outputs=online"
        teacher = OnlineTeachers(load_members(teachers.member_files, run.device, what))
        say(f"  teachers run on every batch ({len(teacher.models)} members, online)")
        return augmentation, teacher
    if augmentation is None:  # train-teachers' logits on the transfer set
        logits = cache["train"][:, idx.cpu()]
        return None, CachedLogits({"logits": logits}, data.num_classes).to(run.device)
    m = t.views_per_example
    if m is not None and m < augmentation.count:
        augmentation = augment.subset(augmentation, len(idx), m, t.views_seed, run.device)
        record["augment"] = augmentation.describe()
    cached, record["view_cache"] = view_cache(
        sources=artifacts.cache_identity(teachers.identities, "member_"),
        member_files=teachers.member_files,
        fingerprint=data.fingerprint,
        cache_dir=teachers.cache_dir,
        x=data.x_train[idx],
        transfer=idx,
        num_classes=data.num_classes,
        augmentation=augmentation,
        top_k=t.top_k,
        max_mb=t.max_mb,
        # On a CPU, batches of 256 images score a CNN about 10% faster than 1,024.
        batch_size=min(256, cfg.train.eval_batch_size)
        if run.device.type == "cpu"
        else cfg.train.eval_batch_size,
        device=run.device,
        say=say,
    )
    return augmentation, cached.to(run.device)


def inference_cost(
    run: Run, teachers: Teachers, student: torch.nn.Module, x: torch.Tensor, batch_size: int
) -> dict[str, float | None]:
    """Examples per second of the teacher ensemble and of the student on the first test
    examples (same device, same batch size), and the ratio: `inference_speedup`.

    The student is timed here. The teachers' figure is the one their run recorded when it was
    measured on this machine, device, thread count and batch size (core/inference_speed.py);
    otherwise (another machine, or a run made before the record existed) they are timed here,
    in alternation with the student; None when their checkpoints are gone. Where it came from
    goes in the manifest (`inference`) and is said."""
    x = timed_inputs(x)
    if not len(x):
        return dict.fromkeys(
            ("inference_speedup", "teacher_examples_per_s", "student_examples_per_s")
        )
    here = machine(run.device, batch_size, len(x))
    teacher_rate = recorded_speed([m.get("inference") for m in teachers.manifests], here)
    groups: dict[str, list[torch.nn.Module]] = {"student": [student]}
    if teacher_rate is not None:
        how, origin = "recorded", f"recorded by {teachers.source} on this machine"
    elif teachers.member_files:
        groups["teachers"] = [load_model(f, run.device) for f in teachers.member_files]
        how, origin = "timed", f"timed by this run: {_why_timed(teachers, here)}"
    else:
        how, origin = None, "none: the teachers' checkpoints are gone"
    best = best_seconds(groups, x, batch_size, run.device)
    if "teachers" in best:
        teacher_rate = len(x) / best["teachers"]
    student_rate = len(x) / best["student"]
    run.info["inference"] = {"teachers": how, "source": origin, "machine": here}
    say(
        f"  inference on {len(x)} test examples: student {student_rate:,.0f} examples/s, "
        + ("teachers -" if teacher_rate is None else f"teachers {teacher_rate:,.0f} examples/s")
        + f" ({origin})"
    )
    return {
        "inference_speedup": None if teacher_rate is None else student_rate / teacher_rate,
        "teacher_examples_per_s": teacher_rate,
        "student_examples_per_s": student_rate,
    }


def _why_timed(teachers: Teachers, here: dict[str, Any]) -> str:
    """Why the teachers runs' own figure could not serve: none recorded, or what differs."""
    records = [m.get("inference") for m in teachers.manifests]
    if any(not isinstance(r, dict) for r in records):
        return "their run recorded no figure"
    theirs = next(r.get("machine") or {} for r in records if r.get("machine") != here)
    differ = sorted(k for k in set(theirs) | set(here) if theirs.get(k) != here.get(k))
    return f"their record differs from this run in {', '.join(differ)}"


def savings(m: dict[str, Any]) -> str:
    """What distillation bought, in the sentence users want."""
    kept = m["test_accuracy"] / m["teacher_test_accuracy"] if m["teacher_test_accuracy"] else 0
    parts = []
    if m.get("teacher_params"):
        parts.append(f"1/{m['teacher_params'] / m['student_params']:.1f} of its parameters")
    if m.get("inference_speedup"):
        parts.append(f"1/{m['inference_speedup']:.1f} of its inference time")
    cost = f" with {' and '.join(parts)}" if parts else ""
    return f"the student keeps {100 * kept:.1f}% of the teacher ensemble's test accuracy{cost}"


def _print_table(
    cfg: DictConfig,
    data: Data,
    teachers: Teachers,
    teacher_metrics: dict[str, Any],
    baseline: dict[str, Any],
    student: dict[str, Any],
    alpha: float,
) -> None:
    def row(label: str, m: dict[str, Any], prefix: str = "", *cost: Any) -> list[Any]:
        keys = ("test_accuracy", "test_errors", "test_nll", "test_ece", "teacher_agreement")
        return [label, *(m.get(prefix + k) for k in keys), *(cost or (None, None))]

    def speed(examples_per_s: float | None) -> int | None:
        return None if examples_per_s is None else round(examples_per_s)

    student_cost = (student["student_params"], speed(student["student_examples_per_s"]))
    rows = [
        row(f"teacher {i} ({'seed ' + str(m['seed']) if 'seed' in m else m.get('kind')})", m)
        for i, m in enumerate(teachers.members)
    ]
    teacher_label = f"teacher ensemble ({cfg.ensemble})"
    combination = teachers.combination
    if combination:  # an evaluate run: show the generalist next to its combination
        accuracy = combination["generalist_accuracy"]
        errors = round((1 - accuracy) * len(data.y_test))
        generalist = {"test_accuracy": accuracy, "test_errors": errors}
        rows.append(row("generalist (of the evaluate run)", generalist))
        teacher_label = "generalist + specialists (KL combination)"
    rows.append(
        row(
            teacher_label,
            {**teacher_metrics, "teacher_agreement": 1.0},
            "",
            student["teacher_params"],
            speed(student["teacher_examples_per_s"]),
        )
    )
    if baseline:
        hard = "student, hard labels (alpha=0)"
        if not cfg.transfer.labels:
            hard = "student, hard labels (the labels distill did not use)"
        rows.append(row(hard, baseline, "", *student_cost))
    distilled = f"student, distilled (T={float(cfg.T):g}, alpha={alpha:g}, {cfg.loss.name})"
    rows.append(row(distilled, student, "", *student_cost))
    if "omit_bias" in student:
        label = f"  before the bias correction (+{student['omit_bias']:g})"
        rows.append(row(label, {**student, "uncorrected_teacher_agreement": None}, "uncorrected_"))
    results_table(
        f"distill on {data.name}: {len(data.y_test)} test examples",
        ["model", "test acc", "errors", "NLL", "ECE", "agree", "params", "examples/s"],
        rows,
        legend=(
            "on the test set: accuracy, errors, NLL, ECE (calibration error), agree (share "
            "classified as the teacher ensemble does); params: parameters; examples/s: "
            f"inference speed (batches of {cfg.train.eval_batch_size}, {data.x_test.device})"
        ),
    )
