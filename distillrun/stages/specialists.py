"""`distillrun specialists`: cluster a generalist's confusions and train one specialist per cluster.

Writes to its run folder: clusters.json (the class sets and how they were found),
covariance.png (the covariance matrix ordered by cluster), specialist_<m>.pt (each specialist,
its dustbin logit already corrected), metrics.jsonl, and manifest.json last. With
`specialists.index=m` the run trains only specialist m, so a sweep over the indices trains them
as independent jobs; `distillrun evaluate` collects them.
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
from omegaconf import DictConfig

from distillrun import choices
from distillrun.choices import one_of
from distillrun.config import (
    Problems,
    check_basics,
    check_dataset,
    check_optim,
    in_range,
    is_int,
    is_run_folder,
)
from distillrun.console import results_table, say
from distillrun.core.data import Data, load_dataset
from distillrun.core.models import checkpoint, load_checkpoint, output_layer
from distillrun.errors import UserError
from distillrun.method.augment import Batch
from distillrun.method.clustering import (
    adjusted_rand_index,
    cluster_classes,
    correct_dustbin,
    dustbin_targets,
    half_and_half_batches,
    oversampling_factor,
    plot_covariance,
    probability_covariance,
    soft_target_loss,
    specialist_from,
    specialist_view,
)
from distillrun.runs import artifacts
from distillrun.runs.teacher_runs import ChosenTeachers, check_data, choose_member
from distillrun.stages.common import Run, resolve_teachers, run_stage, train_one, train_settings
from distillrun.stages.train_teachers import dataset_info

GENERALIST_STAGE = "train-teachers"


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="specialists")
def main(cfg: DictConfig) -> float | None:
    return run_stage("specialists", cfg, specialists)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    for check in (check_basics, check_dataset, check_optim):
        check(cfg, p)
    p.need(is_run_folder(cfg.generalist), f"generalist={cfg.generalist}: give a run folder or null")
    s = cfg.specialists
    p.need(is_int(s.k) and s.k >= 2, f"specialists.k={s.k} must be an integer >= 2")
    p.need(
        s.clustering in choices.CLUSTERINGS,
        f"specialists.clustering={s.clustering}: use {one_of(choices.CLUSTERINGS)}",
    )
    p.need(
        in_range(s.overlap, 0, math.inf), f"specialists.overlap={s.overlap} must be a number >= 0"
    )
    share = s.get("overlap_share", 0.0)  # absent from runs made before it existed
    p.need(
        in_range(share, 0, 1),
        f"specialists.overlap_share={share} must be a share in [0, 1] (0: off)",
    )
    p.need(is_int(s.member) and s.member >= 0, f"specialists.member={s.member} must be >= 0")
    p.need(
        s.index is None or (is_int(s.index) and s.index >= 0),
        f"specialists.index={s.index} must be null (all) or a specialist number >= 0",
    )
    if is_int(s.index) and is_int(s.k) and s.index >= s.k:
        p.append(f"specialists.index={s.index} must be below specialists.k={s.k}")
    p.need(isinstance(s.soft_targets, bool), "specialists.soft_targets: use true or false")


def find_generalist(
    named: Any, output_root: Path, data: Data, note: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """The train-teachers run `named`, or the newest complete one on this data."""

    def same_data(manifest: dict[str, Any]) -> str | None:
        return check_data(manifest, data)

    if named is None:
        folder, manifest = artifacts.newest_complete_run(
            output_root, GENERALIST_STAGE, same_data, note
        )
    else:
        folder = Path(str(named))
        manifest = artifacts.complete_run(folder, GENERALIST_STAGE)
        why_not = same_data(manifest)
        if why_not:
            raise UserError(f"{why_not}: pass the dataset settings the generalist was trained on")
    return folder.resolve(), manifest


def choose_generalist(
    cfg: DictConfig, data: Data, named: Any, note: Callable[[str], None]
) -> ChosenTeachers:
    """The generalist: member `specialists.member` of the run `named` (`generalist=`, by
    default the newest on this data), with its run's logits."""
    folder, manifest = find_generalist(named, Path(cfg.paths.output_root), data, note)
    member = int(cfg.specialists.member)
    n_members = len(manifest.get("metrics", {}).get("members", [])) or 1
    if member >= n_members:
        raise UserError(
            f"specialists.member={member} but {folder} has {n_members} member(s): use 0.."
            f"{n_members - 1}"
        )
    read = ["logits.pt"]
    if (folder / f"member_{member}.pt").is_file():  # (an imported member may have none: below)
        read.append(f"member_{member}.pt")
    return choose_member(folder, manifest, data, member, read)


def specialists(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Cluster the classes the generalist confuses, and train one specialist per cluster (or
    only specialist `specialists.index`) from the generalist's weights.

    Consumes a train-teachers run (`generalist=`, by default the newest on this data): its
    logits.pt and the member's checkpoint. Writes clusters.json, covariance.png,
    specialist_<m>.pt (dustbin logit corrected), metrics.jsonl, and as metrics the clusters
    and each specialist's validation accuracy.
    """
    data = load_dataset(cfg.dataset)
    s = cfg.specialists
    k, member = int(s.k), int(s.member)
    if k > data.num_classes:
        raise UserError(
            f"specialists.k={k} but dataset={data.name} has {data.num_classes} classes: "
            "use fewer clusters"
        )
    chosen = resolve_teachers(
        run, "generalist", cfg.generalist, partial(choose_generalist, cfg, data), data
    )
    # The member's own architecture (an imported one need not be its run's `model` config).
    member_file = Path(chosen.source) / f"member_{member}.pt"
    generalist, model_cfg = load_checkpoint(member_file, run.device)
    run.info["dataset"] = dataset_info(data, cfg)
    data = data.to(run.device)
    # The transfer set is the training split; the clustering sees no labels.
    train_log_p = F.log_softmax(chosen.logits["train"][member].float(), dim=-1).to(run.device)
    clusters, ari = cluster_and_record(cfg, run, data, train_log_p)
    indices = list(range(len(clusters))) if s.index is None else [int(s.index)]
    full = bool(s.soft_targets)
    trained = [
        train_specialist(run, cfg, data, generalist, model_cfg, m, clusters[m], train_log_p, full)
        for m in indices
    ]
    run.info["specialists"] = {
        "clusters": clusters,
        "trained": indices,
        "generalist_member": member,
        "soft_targets": full,
    }
    print_specialists(data, clusters, ari, trained)
    say(f"run folder: {run.dir}")
    metrics: dict[str, Any] = {"clusters": len(clusters), "specialists_trained": len(indices)}
    if ari is not None:
        metrics["cluster_ari"] = ari
    metrics["minutes"] = sum(t["seconds"] for t in trained) / 60
    metrics["members"] = trained
    return metrics


def cluster_and_record(
    cfg: DictConfig, run: Run, data: Data, train_log_p: torch.Tensor
) -> tuple[list[list[int]], float | None]:
    """The clusters of the generalist's probabilities' covariance on the training split, and
    their adjusted Rand index against the superclasses (None without superclasses); written
    as clusters.json and covariance.png, and said in one line."""
    s = cfg.specialists
    cov = probability_covariance(train_log_p.exp().cpu())
    clusters, primary = cluster_classes(
        cov, int(s.k), s.clustering, float(s.overlap), cfg.seed, float(s.get("overlap_share", 0.0))
    )
    if any(len(c) == data.num_classes for c in clusters):
        raise UserError(
            "a cluster holds every class, so its dustbin would never be trained: "
            "raise specialists.k or lower specialists.overlap"
        )
    if s.index is not None and s.index >= len(clusters):
        raise UserError(
            f"specialists.index={s.index} but there are {len(clusters)} clusters: use 0.."
            f"{len(clusters) - 1}"
        )
    ari = adjusted_rand_index(data.superclass, primary) if data.superclass else None
    artifacts.write_json(
        run.dir / "clusters.json",
        {
            "k": int(s.k),
            "clustering": s.clustering,
            "overlap": float(s.overlap),
            "overlap_share": float(s.get("overlap_share", 0.0)),
            "clusters": clusters,
            "primary": primary,
            "superclass": data.superclass,
            "cluster_ari": ari,
        },
    )
    plot_covariance(run.dir / "covariance.png", cov, clusters, primary)
    say(
        f"  {len(clusters)} clusters of sizes {[len(c) for c in clusters]} from the covariance "
        f"of its probabilities on {len(data.y_train)} transfer examples"
        + (f"; adjusted Rand index against the superclasses {ari:.3f}" if ari is not None else "")
        + f", on {run.device} -> {run.dir}"
    )
    return clusters, ari


def print_specialists(
    data: Data, clusters: list[list[int]], ari: float | None, trained: list[dict[str, Any]]
) -> None:
    results_table(
        f"specialists on {data.name}: {len(clusters)} clusters"
        + (f", adjusted Rand index {ari:.3f}" if ari is not None else ""),
        ["specialist", "classes", "oversampling", "val accuracy (with dustbin)", "best epoch"],
        [
            [t["index"], " ".join(map(str, t["classes"]))]
            + [f"{t['oversampling_factor']:.1f}x", t["val_accuracy"], t["best_epoch"]]
            for t in trained
        ],
    )


def dustbin_loss(out: torch.Tensor, b: Batch, *, target: torch.Tensor) -> torch.Tensor:
    """A specialist's loss on batch `b`: cross-entropy with `target`, each example's class
    among the specialist's, or the dustbin."""
    return F.cross_entropy(out, target[b.idx])


def soft_targets_loss(
    out: torch.Tensor,
    b: Batch,
    *,
    y: torch.Tensor,
    log_p: torch.Tensor,
    rest_classes: torch.Tensor,
) -> torch.Tensor:
    """`specialists.soft_targets=true`: the hard labels plus the KL from the generalist's
    distribution `log_p` over the non-special classes (clustering.soft_target_loss)."""
    return soft_target_loss(out, y[b.idx], log_p[b.idx], rest_classes)


def corrected_view(
    logits: torch.Tensor,
    *,
    classes: list[int],
    rest_classes: torch.Tensor,
    shift: float,
    full: bool,
) -> torch.Tensor:
    """Validation logits with the dustbin correction `shift` applied, as the specialist's
    classes plus the dustbin: a specialist is selected on natural data, so judged corrected."""
    shifted = logits.clone()
    if full:
        shifted[:, rest_classes] += shift
    else:
        shifted[:, -1] += shift
    return specialist_view(shifted, classes)


def specialist_objective(
    data: Data, classes: list[int], train_log_p: torch.Tensor, shift: float, full: bool
) -> tuple[Callable[[torch.Tensor, Batch], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """A specialist's loss on a batch, and its view of validation logits (dustbin corrected by
    `shift`); `full`: the soft-targets variant."""
    y, device = data.y_train, data.y_train.device
    rest_classes = torch.tensor(
        [c for c in range(data.num_classes) if c not in set(classes)], device=device
    )
    if full:
        loss_fn = partial(soft_targets_loss, y=y, log_p=train_log_p, rest_classes=rest_classes)
    else:
        loss_fn = partial(dustbin_loss, target=dustbin_targets(y, classes, data.num_classes))
    view = partial(
        corrected_view, classes=classes, rest_classes=rest_classes, shift=shift, full=full
    )
    return loss_fn, view


def train_specialist(
    run: Run,
    cfg: DictConfig,
    data: Data,
    generalist: torch.nn.Module,
    model_cfg: dict[str, Any],
    m: int,
    classes: list[int],
    train_log_p: torch.Tensor,
    full: bool,
) -> dict[str, Any]:
    """Specialist m: from the generalist's weights, on half-and-half batches, selected on the
    validation split with its dustbin correction applied; saved as specialist_<m>.pt."""
    device, y = run.device, data.y_train
    in_s = torch.isin(y, torch.tensor(classes, device=device))
    special, rest = torch.nonzero(in_s).flatten(), torch.nonzero(~in_s).flatten()
    shift = math.log(oversampling_factor(len(special), len(y)))
    loss_fn, view = specialist_objective(data, classes, train_log_p, shift, full)
    torch.manual_seed(cfg.seed + m)
    model = specialist_from(generalist, classes, full).to(device)
    fitted = train_one(
        run,
        cfg,
        f"specialist {m}",
        model,
        data.x_train,
        loss_fn,
        data.x_val,
        dustbin_targets(data.y_val, classes, data.num_classes),
        train_settings(cfg, cfg.seed + m, max_norm=model_cfg.get("max_norm")),
        batches=partial(half_and_half_batches, special, rest, cfg.train.batch_size),
        val_view=view,
    )
    correct_dustbin(model, classes, full, shift)
    ckpt = checkpoint(model, model_cfg, data.input_shape, output_layer(model).out_features)
    artifacts.save_tensors(
        run.dir / f"specialist_{m}.pt",
        {**ckpt, "classes": classes, "dustbin_correction": shift, "soft_targets": full},
    )
    say(
        f"  specialist {m}: classes {classes}, dustbin logit +{shift:.3f} "
        f"(oversampled {math.exp(shift):.1f}x), epoch {fitted.best_epoch} of "
        f"{cfg.train.epochs}, {fitted.seconds:.1f}s"
    )
    best = fitted.history[fitted.best_epoch - 1] if fitted.history else {}
    return {
        "index": m,
        "classes": classes,
        "train_examples": len(special),
        "oversampling_factor": math.exp(shift),
        "dustbin_correction": shift,
        "best_epoch": fitted.best_epoch,
        "val_accuracy": best.get("val_accuracy"),
        "seconds": fitted.seconds,
    }
