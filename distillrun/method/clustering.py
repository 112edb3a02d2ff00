"""Specialists (the paper's section 5): confusable class clusters, dustbin heads, oversampling.

A generalist's predicted probabilities on the transfer set give a C x C covariance matrix;
classes the generalist confuses co-vary, so k-means on its columns finds the class sets S^m.
Specialist m starts from the generalist's weights with a head over S^m plus a dustbin class
for everything else, and trains on batches that are half from S^m and half from the rest.
Oversampling S^m biases it against the dustbin; adding log(oversampling factor) to the
dustbin logit afterwards undoes that.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillrun.choices import CLUSTERINGS, one_of
from distillrun.core.models import output_layer
from distillrun.errors import UserError


def probability_covariance(probs: torch.Tensor) -> torch.Tensor:
    """The C x C covariance matrix of predicted probabilities [N, C] (no labels involved)."""
    centred = probs.double() - probs.double().mean(dim=0)
    return centred.T @ centred / max(len(probs) - 1, 1)


def cluster_classes(
    cov: torch.Tensor,
    k: int,
    method: str = "kmeans",
    overlap: float = 0.0,
    seed: int = 0,
    share: float = 0.0,
) -> tuple[list[list[int]], list[int]]:
    """k-means on the columns of `cov`: (class sets ordered by smallest class, primary cluster of
    each class). With overlap > 0 a class also joins every cluster whose centre is at most
    (1 + overlap) times as far from it as its own cluster's centre; with share > 0, every
    cluster that holds at least that share of its confusions (confusion_shares)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    points = cov.double().cpu().numpy()
    if method == "kmeans":
        km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    elif method == "online":
        km = MiniBatchKMeans(n_clusters=k, n_init=10, random_state=seed, batch_size=256)
    else:
        raise UserError(f"specialists.clustering={method}: use {one_of(CLUSTERINGS)}")
    labels = km.fit_predict(points)
    dist = km.transform(points)
    own = dist[np.arange(len(points)), labels]
    near = dist <= (1 + overlap) * own[:, None]
    if share > 0:
        near |= confusion_shares(cov, labels, k) >= share
    members = [np.flatnonzero((labels == m) | near[:, m]) for m in range(k)]
    # Empty clusters (duplicate columns, e.g. classes never predicted) are dropped; the rest are
    # numbered by their smallest class so that every job of a sweep agrees on the numbering.
    order = sorted((m for m in range(k) if (labels == m).any()), key=lambda m: members[m].min())
    renumber = {m: i for i, m in enumerate(order)}
    return [members[m].tolist() for m in order], [renumber[int(m)] for m in labels]


def confusion_shares(cov: torch.Tensor, labels: Sequence[int], k: int) -> np.ndarray:
    """[C, k]: the share of each class's positive covariance with the other classes that falls
    in each cluster. A class whose examples lie partly among another group's classes co-varies
    with that group too; in covariance-column distances its own large variance hides this."""
    pos = cov.double().cpu().numpy().clip(min=0)
    np.fill_diagonal(pos, 0)
    onehot = np.asarray(labels)[:, None] == np.arange(k)
    return (pos @ onehot) / np.maximum(pos.sum(axis=1, keepdims=True), 1e-300)


def adjusted_rand_index(a: Sequence[int], b: Sequence[int]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(a), list(b)))


def dustbin_targets(y: torch.Tensor, classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Labels in a specialist's output space: the position of y in `classes`, else the dustbin
    (index len(classes))."""
    lookup = torch.full((num_classes,), len(classes), dtype=torch.long, device=y.device)
    lookup[torch.as_tensor(list(classes), device=y.device)] = torch.arange(
        len(classes), device=y.device
    )
    return lookup[y]


def collapse(log_probs: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Log-probabilities [N, C] collapsed to `classes` plus a dustbin holding the rest's sum."""
    special = torch.zeros(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    special[list(classes)] = True
    dustbin = torch.logsumexp(log_probs[..., ~special], dim=-1, keepdim=True)
    return torch.cat([log_probs[..., list(classes)], dustbin], dim=-1)


def oversampling_factor(n_special: int, n_total: int, share: float = 0.5) -> float:
    """How much more often S^m shows up, relative to the rest, in batches with `share` of S^m
    than in the data: (share / (1 - share)) / (n_special / n_rest). 1 when nothing is
    oversampled; the dustbin logit correction is its log."""
    n_rest = n_total - n_special
    if n_special < 1 or n_rest < 1:
        raise ValueError("both the special classes and the rest need examples")
    return (share / (1 - share)) / (n_special / n_rest)


def half_and_half_batches(
    special: torch.Tensor, rest: torch.Tensor, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch of batches: every S^m example once, each batch half S^m and half the rest
    (drawn at random, without replacement where the rest is big enough)."""
    half = max(1, batch_size // 2)
    sp = special[torch.randperm(len(special), generator=generator).to(special.device)]
    if len(rest) >= len(sp):
        pick = torch.randperm(len(rest), generator=generator)[: len(sp)]
    else:
        pick = torch.randint(len(rest), (len(sp),), generator=generator)
    rs = rest[pick.to(rest.device)]
    return [torch.cat([sp[i : i + half], rs[i : i + half]]) for i in range(0, len(sp), half)]


def _replace_output_layer(model: nn.Module, layer: nn.Linear) -> None:
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def specialist_from(generalist: nn.Module, classes: Sequence[int], full: bool) -> nn.Module:
    """A copy of the generalist; unless `full`, its head is cut down to `classes` plus a
    dustbin whose weights start as the mean of the other classes' (its bias as their
    log-sum, so the dustbin starts near the generalist's mass on the rest)."""
    model = copy.deepcopy(generalist)
    if full:
        return model
    old = output_layer(model)
    rest = [c for c in range(old.out_features) if c not in set(classes)]
    new = nn.Linear(old.in_features, len(classes) + 1).to(old.weight.device)
    with torch.no_grad():
        new.weight[:-1] = old.weight[list(classes)]
        new.bias[:-1] = old.bias[list(classes)]
        new.weight[-1] = old.weight[rest].mean(dim=0)
        new.bias[-1] = old.bias[rest].mean() + math.log(len(rest))
    _replace_output_layer(model, new)
    return model


def correct_dustbin(model: nn.Module, classes: Sequence[int], full: bool, shift: float) -> None:
    """Add `shift` (log of the oversampling factor) to the dustbin logit: the dustbin's bias, or
    with a full softmax the bias of every class outside `classes`."""
    layer = output_layer(model)
    with torch.no_grad():
        if full:
            rest = torch.ones(layer.out_features, dtype=torch.bool, device=layer.bias.device)
            rest[list(classes)] = False
            layer.bias[rest] += shift
        else:
            layer.bias[-1] += shift


def specialist_view(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Log-probabilities over `classes` plus dustbin from a specialist's logits (a dustbin head
    has len(classes) + 1 outputs; a full-softmax specialist is collapsed)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return log_p if logits.shape[-1] == len(classes) + 1 else collapse(log_p, classes)


def soft_target_loss(
    logits: torch.Tensor, y: torch.Tensor, generalist_log_p: torch.Tensor, rest: torch.Tensor
) -> torch.Tensor:
    """The paper's proposed variant: hard targets over the full softmax, plus KL from the
    generalist's distribution over the non-special classes (renormalised) to the specialist's."""
    p = F.log_softmax(generalist_log_p[:, rest], dim=-1)
    q = F.log_softmax(logits[:, rest], dim=-1)
    soft = F.kl_div(q, p, log_target=True, reduction="batchmean")
    return F.cross_entropy(logits, y) + soft


def plot_covariance(
    path: Path, cov: torch.Tensor, clusters: list[list[int]], primary: list[int]
) -> None:
    """The covariance matrix with classes ordered by cluster, cluster borders drawn."""
    from distillrun.runs.artifacts import pyplot, save_figure

    plt = pyplot()

    order = sorted(range(len(primary)), key=lambda c: (primary[c], c))
    m = cov.cpu().numpy()[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(7, 6))
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    edges = np.cumsum([sum(1 for c in primary if c == i) for i in range(len(clusters))])
    for e in edges[:-1]:
        ax.axhline(e - 0.5, color="k", lw=0.5)
        ax.axvline(e - 0.5, color="k", lw=0.5)
    ax.set_title(f"covariance of the generalist's probabilities, {len(clusters)} clusters")
    ax.set_xlabel("class (ordered by cluster)")
    ax.set_ylabel("class (ordered by cluster)")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)
