"""`distillrun specialists`: cluster a generalist's confusions and train one specialist per cluster.

Writes to its run folder: clusters.json (the class sets and how they were found),
covariance.png (the covariance matrix ordered by cluster), specialist_<m>.pt (each specialist,
its dustbin logit already corrected), metrics.jsonl, and manifest.json last. With
`specialists.index=m` the run trains only specialist m, so a sweep over the indices trains them
as independent jobs; `distillrun evaluate` collects them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distillrun.console import results_table, say
from distillrun.core import distributed
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
from distillrun.runs.teacher_runs import check_data, load_run_logits
from distillrun.stages.common import Run, run_stage, train_one, train_settings
from distillrun.stages.train_teachers import dataset_info

GENERALIST_STAGE = "train-teachers"


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="specialists")
def main(cfg: DictConfig) -> float | None:
    return run_stage("specialists", cfg, specialists)


def find_generalist(
    cfg: DictConfig, data: Data, pinned: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The train-teachers run named by `generalist=` (or `pinned`: the one a resumed run began
    with), or the newest complete one on this data."""

    def same_data(manifest: dict[str, Any]) -> str | None:
        return check_data(manifest, data)

    named = cfg.generalist if cfg.generalist is not None else pinned
    if named is None:
        folder, manifest = artifacts.newest_complete_run(
            Path(cfg.paths.output_root), GENERALIST_STAGE, same_data, say
        )
    else:
        folder = Path(str(named))
        manifest = artifacts.complete_run(folder, GENERALIST_STAGE)
        why_not = same_data(manifest)
        if why_not:
            raise UserError(f"{why_not}: pass the dataset settings the generalist was trained on")
    return folder.resolve(), manifest


def specialists(cfg: DictConfig, run: Run) -> dict[str, Any]:
    data = load_dataset(cfg.dataset)
    s = cfg.specialists
    k, member = int(s.k), int(s.member)
    if k > data.num_classes:
        raise UserError(
            f"specialists.k={k} but dataset={data.name} has {data.num_classes} classes: "
            "use fewer clusters"
        )
    pinned = run.inputs.get("generalist") if run.resuming else None  # keep what it began with
    if distributed.is_main():
        folder, generalist_run = find_generalist(cfg, data, pinned)
    # Under torchrun the other processes take process 0's generalist (the newest could change).
    chosen = distributed.broadcast(str(folder) if distributed.is_main() else None)
    if not distributed.is_main():
        folder, generalist_run = find_generalist(cfg, data, chosen)
    n_members = len(generalist_run.get("metrics", {}).get("members", [])) or 1
    if member >= n_members:
        raise UserError(
            f"specialists.member={member} but {folder} has {n_members} member(s): use 0.."
            f"{n_members - 1}"
        )
    cache = load_run_logits(folder, data)
    read = ["logits.pt"]
    if (folder / f"member_{member}.pt").is_file():  # (an imported member may have none: below)
        read.append(f"member_{member}.pt")
    run.add_input("generalist", folder, [artifacts.run_identity(folder, generalist_run, read)])
    # The member's own architecture (an imported one need not be its run's `model` config).
    generalist, model_cfg = load_checkpoint(folder / f"member_{member}.pt", run.device)
    run.info["dataset"] = dataset_info(data, cfg)
    data = data.to(run.device)
    device = run.device

    # The transfer set is the training split; the clustering sees no labels.
    train_log_p = F.log_softmax(cache["train"][member].float(), dim=-1).to(device)
    cov = probability_covariance(train_log_p.exp().cpu())
    clusters, primary = cluster_classes(
        cov, k, s.clustering, float(s.overlap), cfg.seed, float(s.get("overlap_share", 0.0))
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
            "k": k,
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
        f"specialists: generalist {folder} (member {member})\n"
        f"  {len(clusters)} clusters of sizes {[len(c) for c in clusters]} from the covariance "
        f"of its probabilities on {len(data.y_train)} transfer examples"
        + (f"; adjusted Rand index against the superclasses {ari:.3f}" if ari is not None else "")
        + f", on {device} -> {run.dir}"
    )

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
    say(f"run folder: {run.dir}")
    metrics: dict[str, Any] = {"clusters": len(clusters), "specialists_trained": len(indices)}
    if ari is not None:
        metrics["cluster_ari"] = ari
    metrics["minutes"] = sum(t["seconds"] for t in trained) / 60
    metrics["members"] = trained
    return metrics


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
    device, y, n = run.device, data.y_train, len(data.y_train)
    in_s = torch.isin(y, torch.tensor(classes, device=device))
    special, rest = torch.nonzero(in_s).flatten(), torch.nonzero(~in_s).flatten()
    shift = math.log(oversampling_factor(len(special), n))
    rest_classes = torch.tensor(
        [c for c in range(data.num_classes) if c not in set(classes)], device=device
    )
    target = dustbin_targets(y, classes, data.num_classes)

    def loss_fn(out: torch.Tensor, b: Batch) -> torch.Tensor:
        if full:
            return soft_target_loss(out, y[b.idx], train_log_p[b.idx], rest_classes)
        return F.cross_entropy(out, target[b.idx])

    def val_view(logits: torch.Tensor) -> torch.Tensor:
        # Selected on natural data, so judged with the dustbin correction applied.
        shifted = logits.clone()
        if full:
            shifted[:, rest_classes] += shift
        else:
            shifted[:, -1] += shift
        return specialist_view(shifted, classes)

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
        batches=lambda g: half_and_half_batches(special, rest, cfg.train.batch_size, g),
        val_view=val_view,
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
