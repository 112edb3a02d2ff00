"""`distillrun evaluate`: classify with the generalist plus its specialists, the paper's way.

For each example: the generalist's top-n classes pick the active specialists, and the combined
distribution q minimises KL(p_g || q) + sum over active m of KL(p_m || collapse_m(q))
(distillrun.method.combination).
Writes by_coverage.png (the paper's table as bars), logits.pt (log q
on every split, in train-teachers' format with one member, so `distill teachers=<this run>`
distills the combination into one net), metrics.jsonl and manifest.json last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distillrun import choices
from distillrun.choices import one_of
from distillrun.config import Problems, check_basics, in_range, is_int, is_run_folder
from distillrun.console import results_table, say
from distillrun.core.data import Data, load_dataset
from distillrun.core.models import load_model
from distillrun.core.train import predict
from distillrun.errors import UserError
from distillrun.method.clustering import specialist_view
from distillrun.method.combination import active_specialists, combine_kl
from distillrun.method.metrics import classification_metrics
from distillrun.runs import artifacts
from distillrun.runs.teacher_runs import choose_member
from distillrun.stages.common import Run, resolve_teachers, run_stage

SPECIALISTS_STAGE = "specialists"
GENERALIST_STAGE = "train-teachers"
SPLITS = ("train", "val", "test")


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_stage("evaluate", cfg, evaluate)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    check_basics(cfg, p)
    p.need(is_run_folder(cfg.specialists), f"specialists={cfg.specialists}: give a folder or null")
    p.need(is_int(cfg.n) and cfg.n >= 1, f"n={cfg.n} must be an integer >= 1 (the paper: 1)")
    p.need(
        cfg.optimizer in choices.KL_OPTIMIZERS,
        f"optimizer={cfg.optimizer}: use {one_of(choices.KL_OPTIMIZERS)}",
    )
    p.need(
        in_range(cfg.tolerance, 0, math.inf, lo_open=True),
        f"tolerance={cfg.tolerance} must be a number > 0, e.g. 1e-5",
    )
    p.need(is_int(cfg.max_iter) and cfg.max_iter >= 1, f"max_iter={cfg.max_iter} must be >= 1")


def _trained(manifest: dict[str, Any]) -> list[int]:
    return list(manifest.get("specialists", {}).get("trained", []))


def _collect(jobs: list[tuple[Path, dict[str, Any]]], where: Path) -> list[tuple[Path, int]]:
    """(folder, index) of every specialist, checking that the jobs agree and none is missing."""
    first = jobs[0][1]
    key = ("clusters", "generalist_member", "soft_targets")
    for folder, m in jobs[1:]:
        same = all(m["specialists"].get(k) == first["specialists"].get(k) for k in key)
        same = same and m.get("inputs") == first.get("inputs")
        if not same:
            raise UserError(
                f"{folder} and {jobs[0][0]} disagree on the generalist or the clusters: "
                f"{where} mixes different specialists runs; pass one sweep or one run"
            )
    found = {i: folder for folder, m in jobs for i in _trained(m)}
    k = len(first["specialists"]["clusters"])
    missing = [i for i in range(k) if i not in found]
    if missing:
        raise UserError(
            f"{where} has no complete run for specialist(s) {missing} of {k}: run them "
            f"(`distillrun specialists -m specialists.index=...`) or pass a complete set"
        )
    return [(found[i], i) for i in range(k)]


def _sweep_jobs(
    folder: Path, note: Callable[[str], None] = say
) -> list[tuple[Path, dict[str, Any]]]:
    jobs, unfinished = [], []
    for job in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            manifest = artifacts.read_manifest(job)
        except UserError:
            manifest = None
        if artifacts.is_complete(manifest, SPECIALISTS_STAGE):
            jobs.append((job, manifest))
        elif (job / ".hydra").is_dir():
            unfinished.append(job.name)
    if not jobs:
        raise UserError(
            f"{folder} holds no complete specialists run: pass a specialists run folder or the "
            "multirun folder of its index jobs"
        )
    if unfinished:
        note(f"skipped unfinished or failed job(s) {', '.join(unfinished)} in {folder}")
    return jobs


def find_specialists(
    cfg: DictConfig, note: Callable[[str], None] = say
) -> tuple[list[tuple[Path, int]], dict[str, Any]]:
    """Each specialist's run folder and index, and the manifest of one of those runs.

    `specialists=` names one run holding every specialist, or a sweep folder of index jobs; by
    default the newest complete specialists run, with the other jobs of its sweep if it holds
    only some of the specialists. `note` gets what was skipped.
    """
    if cfg.specialists is None:
        folder, manifest = artifacts.newest_complete_run(
            Path(cfg.paths.output_root), SPECIALISTS_STAGE, lambda m: None, note
        )
        folder = folder.resolve()
        k = len(manifest["specialists"]["clusters"])
        if len(_trained(manifest)) == k:
            return [(folder, i) for i in range(k)], manifest
        jobs = _sweep_jobs(folder.parent, note)
        return _collect(jobs, folder.parent), manifest
    folder = Path(str(cfg.specialists)).resolve()
    if folder.is_dir() and not (folder / artifacts.MANIFEST).exists():
        if any((p / artifacts.MANIFEST).exists() for p in folder.iterdir() if p.is_dir()):
            jobs = _sweep_jobs(folder, note)
            return _collect(jobs, folder), jobs[0][1]
    manifest = artifacts.complete_run(folder, SPECIALISTS_STAGE)
    if "specialists" not in manifest:
        raise UserError(f"{folder}'s manifest lists no specialists: re-run its stage")
    k = len(manifest["specialists"]["clusters"])
    if len(_trained(manifest)) != k:
        raise UserError(
            f"{folder} holds specialist(s) {_trained(manifest)} of {k} only: pass the multirun "
            "folder that holds all the index jobs"
        )
    return [(folder, i) for i in range(k)], manifest


def specialists_identity(folder: Path, specs: list[tuple[Path, int]]) -> dict[str, Any]:
    """A specialists run's identity, with the hashes of the specialists read from it."""
    manifest = artifacts.complete_run(folder, SPECIALISTS_STAGE)
    read = [f"specialist_{i}.pt" for f, i in specs if f == folder]
    return artifacts.run_identity(folder, manifest, read)


def trained_from(generalist: Path, specialists: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the generalist the specialists were trained from, which must still be
    the run at its path (the combination needs the same generalist's outputs)."""
    manifest = artifacts.complete_run(generalist, GENERALIST_STAGE)
    for recorded in specialists.get("input_runs", {}).get("generalist", []):
        now = artifacts.run_identity(generalist, manifest, recorded["content"])
        why = artifacts.changed_run(recorded, now)
        if why:
            raise UserError(
                f"the specialists were trained from another generalist than the one now at "
                f"{generalist} ({why}): train the specialists again on this generalist"
            )
    return manifest


def by_coverage(
    covering: torch.Tensor, generalist_right: torch.Tensor, combined_right: torch.Tensor
) -> list[dict[str, Any]]:
    """The paper's table: per number of specialists covering the correct class, the examples,
    the correct answers gained, and the relative accuracy change (None where the
    generalist had none of them right: a change relative to 0 is undefined, not 0%)."""
    rows = []
    for c in range(int(covering.max()) + 1 if len(covering) else 0):
        mask = covering == c
        if not mask.any():
            continue
        g, b = int(generalist_right[mask].sum()), int(combined_right[mask].sum())
        rows.append(
            {
                "covering": c,
                "examples": int(mask.sum()),
                "generalist_correct": g,
                "combined_correct": b,
                "gained": b - g,
                "relative_change": (b - g) / g if g else None,
            }
        )
    return rows


def relative(change: float | None) -> str:
    """A relative change as the paper prints it, "+3.4%"; "n/a" where it is undefined."""
    return "n/a" if change is None else f"{100 * change:+.1f}%"


def plot_by_coverage(path: Path, rows: list[dict[str, Any]]) -> None:
    plt = artifacts.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = list(range(len(rows)))
    change = [100 * (r["relative_change"] or 0.0) for r in rows]  # n/a drawn as no bar
    ax.bar(x, change, color="tab:blue")
    ax.set_xticks(x, [str(r["covering"]) for r in rows])
    for i, r in enumerate(rows):
        na = "" if r["relative_change"] is not None else ", n/a"
        ax.annotate(f"n={r['examples']}{na}", (i, change[i]), ha="center", va="bottom")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("specialists covering the correct class")
    ax.set_ylabel("relative accuracy change (%)")
    ax.set_title("generalist + specialists vs generalist (test set)")
    artifacts.save_figure(fig, path)


def evaluate(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Combine the generalist and its specialists per example (the KL combination) on every
    split, and score the combination against the generalist alone.

    Consumes a specialists run or a sweep of its index jobs (`specialists=`, by default the
    newest) and the generalist they were trained from (its logits.pt). Writes logits.pt (log q
    on every split, so distill can take this run as its teachers), by_coverage.png,
    metrics.jsonl, and as metrics the accuracies and the table by coverage.
    """
    notes: list[str] = []
    specs, manifest = find_specialists(cfg, notes.append)
    folders = list(dict.fromkeys(f for f, _ in specs))
    run.add_input(
        "specialists",
        folders[0] if len(folders) == 1 else folders[0].parent,
        [specialists_identity(folder, specs) for folder in folders],
    )
    clusters, member = (
        manifest["specialists"]["clusters"],
        int(manifest["specialists"]["generalist_member"]),
    )
    generalist = Path(manifest.get("inputs", {}).get("generalist", ""))
    generalist_run = trained_from(generalist, manifest)
    data = specialists_data(manifest, specs[0][0])
    run.info["dataset"] = manifest.get("dataset", {})
    chosen = resolve_teachers(
        run,
        "generalist",
        str(generalist),
        lambda named, note: choose_member(generalist, generalist_run, data, member, ["logits.pt"]),
        data,
        notes,
    )
    data = data.to(run.device)
    models = [load_model(folder / f"specialist_{i}.pt", run.device) for folder, i in specs]
    say(
        f"  {len(models)} specialists from {run.inputs['specialists']}"
        + (f" ({len(folders)} jobs)" if len(folders) > 1 else "")
        + f", top-{cfg.n} classes pick the active specialists, on {run.device} -> {run.dir}"
    )
    began = time.perf_counter()
    combined = {
        split: combine_split(cfg, run, data, split, chosen.logits[split][member], clusters, models)
        for split in SPLITS
    }
    seconds = time.perf_counter() - began
    artifacts.save_tensors(
        run.dir / "logits.pt",
        {"fingerprint": data.fingerprint, **{s: combined[s].log_q[None].cpu() for s in SPLITS}},
    )
    metrics = combination_metrics(data, clusters, combined)
    metrics["combination_seconds"] = seconds
    plot_by_coverage(run.dir / "by_coverage.png", metrics["by_coverage"])
    print_evaluation(data, clusters, combined["test"], metrics)
    say(f"run folder: {run.dir}")
    return metrics


def specialists_data(manifest: dict[str, Any], folder: Path) -> Data:
    """The dataset the specialists were trained on, as their run recorded it, checked to be
    the same data still."""
    dataset = manifest.get("dataset", {})
    data = load_dataset(dataset.get("config", {}))
    if data.fingerprint != dataset.get("fingerprint"):
        raise UserError(
            f"dataset={data.name} as configured in {folder} no longer gives the same data "
            "(the fingerprint differs): re-run train-teachers and specialists"
        )
    return data


@dataclass
class Combined:
    """One split's KL combination: log q, the generalist's log p, and which specialists were
    active on each example."""

    log_q: torch.Tensor
    generalist_log_p: torch.Tensor
    active: torch.Tensor


def combine_split(
    cfg: DictConfig,
    run: Run,
    data: Data,
    split: str,
    generalist_logits: torch.Tensor,
    clusters: list[list[int]],
    models: list[torch.nn.Module],
) -> Combined:
    """The generalist plus the specialists its top-n classes make active, on one split; the
    descent's steps logged to metrics.jsonl."""
    x = getattr(data, f"x_{split}")
    log_pg = F.log_softmax(generalist_logits.float(), dim=-1).to(run.device)
    views = [
        specialist_view(predict(model, x, cfg.train.eval_batch_size), classes)
        for model, classes in zip(models, clusters, strict=True)
    ]
    act = active_specialists(log_pg, clusters, cfg.n)
    log_q, steps = (
        combine_kl(log_pg, clusters, views, act, cfg.tolerance, cfg.max_iter, cfg.optimizer)
        if len(x)
        else (log_pg, 0)
    )
    run.log({"split": split, "examples": len(x), "descent_steps": steps})
    if steps == cfg.max_iter:
        say(f"  {split}: the descent stopped at max_iter={cfg.max_iter} before tolerance")
    return Combined(log_q, log_pg, act)


def combination_metrics(
    data: Data, clusters: list[list[int]], combined: dict[str, Combined]
) -> dict[str, Any]:
    """The combination's and the generalist's validation and test scores, overall, where a
    specialist was active, and by the number of specialists covering the correct class."""
    test, y = combined["test"], data.y_test
    g_right = test.generalist_log_p.argmax(dim=1) == y
    c_right = test.log_q.argmax(dim=1) == y
    any_active = test.active.any(dim=1)
    member_of = torch.zeros(len(clusters), data.num_classes, dtype=torch.bool, device=y.device)
    for m, classes in enumerate(clusters):
        member_of[m, classes] = True
    # The paper's Table 4 counts the specialists whose class set holds the correct class ("broken
    # down by the number of specialists covering the class"). Counting only the active ones
    # mixes in whether the generalist was right: its top class picks them.
    covering = member_of[:, y].sum(dim=0)
    rows = by_coverage(covering.cpu(), g_right.cpu(), c_right.cpu())
    active_covering = (test.active & member_of[:, y].T).sum(dim=1)
    return {
        **classification_metrics(combined["val"].log_q, data.y_val, "val"),
        **classification_metrics(test.log_q, y, "test"),
        "generalist_accuracy": float(g_right.float().mean()),
        "combined_accuracy": float(c_right.float().mean()),
        "generalist_val_accuracy": classification_metrics(
            combined["val"].generalist_log_p, data.y_val, "val"
        ).get("val_accuracy"),
        "active_examples": int(any_active.sum()),
        "generalist_conditional_accuracy": float(g_right[any_active].float().mean())
        if any_active.any()
        else None,
        "combined_conditional_accuracy": float(c_right[any_active].float().mean())
        if any_active.any()
        else None,
        "by_coverage": rows,
        "by_active_coverage": by_coverage(active_covering.cpu(), g_right.cpu(), c_right.cpu()),
    }


def print_evaluation(
    data: Data, clusters: list[list[int]], test: Combined, metrics: dict[str, Any]
) -> None:
    """The generalist against the combination, and the table by coverage."""
    gm = classification_metrics(test.generalist_log_p, data.y_test, "test")
    results_table(
        f"evaluate on {data.name}: {len(data.y_test)} test examples, {len(clusters)} "
        f"specialists, {metrics['active_examples']} examples with an active specialist",
        ["model", "test accuracy", "test errors", "test NLL", "conditional accuracy"],
        [
            ["generalist", gm["test_accuracy"], gm["test_errors"], gm["test_nll"]]
            + [metrics["generalist_conditional_accuracy"]],
            ["generalist + specialists (KL combination)", metrics["test_accuracy"]]
            + [metrics["test_errors"], metrics["test_nll"]]
            + [metrics["combined_conditional_accuracy"]],
        ],
    )
    results_table(
        "by the number of specialists covering the correct class",
        ["covering", "test examples", "correct gained", "relative accuracy change"],
        [
            [r["covering"], r["examples"], f"{r['gained']:+d}"] + [relative(r["relative_change"])]
            for r in metrics["by_coverage"]
        ],
    )
