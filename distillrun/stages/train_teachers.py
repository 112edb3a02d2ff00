"""`distillrun train-teachers`: an ensemble of teachers, each member with its own seed.

Writes to its run folder: member_<i>.pt (checkpoints), logits.pt (every member's logits on the
train, val and test splits; the train split is the transfer set distill reads), metrics.jsonl,
and manifest.json last.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from distillrun.choices import ENSEMBLES
from distillrun.config import Problems, check_augment, check_common, is_int
from distillrun.console import results_table, say, warning_line
from distillrun.core import distributed
from distillrun.core.data import Data, load_dataset
from distillrun.core.inference_speed import speed_record
from distillrun.core.models import build_model, checkpoint, count_parameters, load_model
from distillrun.core.train import predict
from distillrun.method import augment
from distillrun.method.augment import Augmentation, Batch
from distillrun.method.ensemble import combine
from distillrun.method.metrics import classification_metrics
from distillrun.runs.artifacts import save_tensors
from distillrun.stages.common import Run, run_stage, train_one, train_settings

SPLITS = ("train", "val", "test")


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="train_teachers")
def main(cfg: DictConfig) -> float | None:
    return run_stage("train-teachers", cfg, train_teachers)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    check_common(cfg, p)
    check_augment(cfg, p)
    t = cfg.teachers
    p.need(is_int(t.n) and t.n >= 1, f"teachers.n={t.n} must be an integer >= 1")
    p.need(
        is_int(t.jitter) and t.jitter >= 0, f"teachers.jitter={t.jitter} must be an integer >= 0"
    )
    if is_int(t.jitter) and t.jitter > 0 and cfg.augment.name != "none":
        p.append(
            f"teachers.jitter={t.jitter} and augment={cfg.augment.name} both augment: drop "
            "teachers.jitter (it is augment=shift augment.pixels=N)"
        )


def dataset_info(data: Data, cfg: DictConfig) -> dict[str, Any]:
    """What the manifest records of the data, so a consumer can check it sees the same splits."""
    return {
        "name": data.name,
        "fingerprint": data.fingerprint,
        "num_classes": data.num_classes,
        "sizes": {s: len(getattr(data, f"y_{s}")) for s in SPLITS},
        "config": OmegaConf.to_container(cfg.dataset, resolve=True),
    }


def ensemble_metrics(stacked: dict[str, torch.Tensor], data: Data) -> dict[str, Any]:
    """Validation and test metrics of the members' ensemble [M, N, C], by each combination."""
    y_val, y_test = data.y_val.cpu(), data.y_test.cpu()
    return {
        method: {
            **classification_metrics(combine(stacked["val"], method), y_val, "val"),
            **classification_metrics(combine(stacked["test"], method), y_test, "test"),
        }
        for method in ENSEMBLES
    }


def train_teachers(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Train `teachers.n` members, member i with seed `seed + i`, each selected on the
    validation split.

    Consumes only the dataset. Writes member_<i>.pt, logits.pt (every member's logits on the
    train, val and test splits: distill's transfer set is the train split), metrics.jsonl,
    and as metrics the ensemble's and each member's validation and test scores.
    """
    data = load_dataset(cfg.dataset)
    augmentation = teacher_augmentation(cfg, run, data)
    run.info["dataset"] = dataset_info(data, cfg)
    data = data.to(run.device)
    n = cfg.teachers.n
    say(
        f"train-teachers: {n} x {cfg.model.name} on {data.name} "
        f"({len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test) "
        + (f"on {augmentation.describe()} " if augmentation else "")
        + f"on {run.device} -> {run.dir}"
    )
    members: list[dict[str, Any]] = []
    models: list[torch.nn.Module] = []
    logits: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for i in range(n):
        model, member, member_logits = train_member(run, cfg, data, augmentation, i)
        members.append(member)
        models.append(model)
        for split in SPLITS:
            logits[split].append(member_logits[split])
    record_inference_speed(run, models, data, cfg.train.eval_batch_size)
    labels = [f"teacher {i} (seed {m['seed']})" for i, m in enumerate(members)]
    return finish_ensemble(run, data, logits, labels, members, count_parameters(model) * n)


def record_inference_speed(
    run: Run, models: list[torch.nn.Module], data: Data, batch_size: int
) -> None:
    """Time the ensemble once, here, for the manifest (`inference`): distill runs on the same
    machine reuse the figure instead of timing the teachers again."""
    if not models or not len(data.y_test) or not distributed.is_main():
        return
    record = speed_record(models, data.x_test, batch_size, run.device)
    run.info["inference"] = record
    say(
        f"  ensemble inference: {record['examples_per_s']:,.0f} examples/s on {run.device} "
        f"(recorded for distill)"
    )


def member_models(files: list[Path], device: torch.device) -> list[torch.nn.Module]:
    """The members from their checkpoints, or [] when any member has none (imported
    logits, ONNX): no ensemble to time."""
    if not files or not all(f.is_file() for f in files):
        return []
    return [load_model(f, device) for f in files]


def teacher_augmentation(cfg: DictConfig, run: Run, data: Data) -> Augmentation | None:
    """`augment=`, or what the deprecated `teachers.jitter` asks for (the same views, drawn
    the same way), with a warning."""
    augment_cfg = cfg.augment
    if cfg.teachers.jitter:  # the key before augment=
        warning_line(
            run.stage,
            f"teachers.jitter={cfg.teachers.jitter} is deprecated: use augment=shift "
            f"augment.pixels={cfg.teachers.jitter} (the same views)",
        )
        augment_cfg = {"name": "shift", "pixels": cfg.teachers.jitter, "border": "replicate"}
    return augment.from_config(augment_cfg, data.image_shape, data.normalization)


def train_member(
    run: Run, cfg: DictConfig, data: Data, augmentation: Augmentation | None, i: int
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """Member i, trained with seed `seed + i` on the hard labels and saved as member_<i>.pt:
    the model, its record (seed, selected epoch, validation and test scores) and its logits
    on each split."""
    started = time.perf_counter()
    seed = cfg.seed + i
    torch.manual_seed(seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(run.device)
    fitted = train_one(
        run,
        cfg,
        f"teacher {i}",
        model,
        data.x_train,
        partial(hard_label_loss, y=data.y_train, classes=data.num_classes),
        data.x_val,
        data.y_val,
        train_settings(cfg, seed, augment=augmentation),
    )
    logits = {split: predict(model, getattr(data, f"x_{split}")).cpu() for split in SPLITS}
    save_tensors(
        run.dir / f"member_{i}.pt",
        checkpoint(model, cfg.model, data.input_shape, data.num_classes),
    )
    member = {
        "seed": seed,
        "best_epoch": fitted.best_epoch,
        "minutes": fitted.seconds / 60,
        **classification_metrics(logits["val"], data.y_val.cpu(), "val"),
        **classification_metrics(logits["test"], data.y_test.cpu(), "test"),
    }
    say(
        f"  teacher {i} (seed {seed}): {member['test_errors']} test errors, "
        f"accuracy {member['test_accuracy']:.4f}, epoch {fitted.best_epoch} of "
        f"{cfg.train.epochs}, {time.perf_counter() - started:.1f}s ({fitted.seconds:.1f}s of "
        "it training)"
    )
    return model, member, logits


def hard_label_loss(out: torch.Tensor, b: Batch, *, y: torch.Tensor, classes: int) -> torch.Tensor:
    """A teacher's loss on batch `b`: cross-entropy with the labels `y` of its examples."""
    return F.cross_entropy(out, b.labels(y, classes))


def finish_ensemble(
    run: Run,
    data: Data,
    logits: dict[str, list[torch.Tensor]],
    labels: list[str],
    members: list[dict[str, Any]],
    teacher_params: int | None,
) -> dict[str, Any]:
    """What a teachers run ends with, trained or imported: logits.pt (every member's logits on
    each split), the table of members and ensembles, and the run's metrics."""
    stacked = {split: torch.stack(v) for split, v in logits.items()}
    save_tensors(run.dir / "logits.pt", {"fingerprint": data.fingerprint, **stacked})
    ensemble = ensemble_metrics(stacked, data)
    rows = [
        [label, m["test_accuracy"], m["test_errors"], m["test_nll"]]
        for label, m in zip(labels, members, strict=True)
    ]
    rows += [
        [f"ensemble, {method} mean", e["test_accuracy"], e["test_errors"], e["test_nll"]]
        for method, e in ensemble.items()
    ]
    results_table(
        f"{run.stage} on {data.name}: {len(data.y_test)} test examples",
        ["model", "test accuracy", "test errors", "test NLL"],
        rows,
    )
    say(f"run folder: {run.dir}")
    return {
        **ensemble["arithmetic"],
        "teacher_params": teacher_params,
        "ensemble": ensemble,
        "members": members,
    }
