"""Specialists and their inference: clustering, dustbin, logit correction, the KL combination."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from distillrun.core.data import load_dataset
from distillrun.method.clustering import (
    adjusted_rand_index,
    cluster_classes,
    collapse,
    confusion_shares,
    correct_dustbin,
    dustbin_targets,
    half_and_half_batches,
    oversampling_factor,
    probability_covariance,
    specialist_from,
    specialist_view,
)
from distillrun.method.combination import active_specialists, combine_kl, objective

# --- covariance and clustering ---------------------------------------------------------------


def confusable_probabilities(n: int = 3000, pairs: int = 3) -> tuple[torch.Tensor, list[int]]:
    """Classes in pairs {0,1}, {2,3}, ...: a model unsure only within its pair."""
    g = torch.Generator().manual_seed(0)
    pair = torch.randint(0, pairs, (n,), generator=g)
    share = torch.rand(n, generator=g)
    p = torch.full((n, 2 * pairs), 0.01)
    p[torch.arange(n), 2 * pair] += 0.96 * share
    p[torch.arange(n), 2 * pair + 1] += 0.96 * (1 - share)
    return p / p.sum(dim=1, keepdim=True), [c // 2 for c in range(2 * pairs)]


def test_covariance_matches_numpy_and_pairs_covary() -> None:
    p, _ = confusable_probabilities()
    cov = probability_covariance(p)
    assert torch.allclose(cov, torch.cov(p.double().T), atol=1e-12)
    assert cov.shape == (6, 6) and torch.allclose(cov, cov.T)
    # Classes the model confuses are high together (on that pair's examples) and low together
    # (elsewhere): they co-vary; classes of different pairs never are both high.
    assert cov[0, 1] > 0 > cov[0, 2] and cov[0, 0] > cov[0, 1]


@pytest.mark.parametrize("method", ["kmeans", "online"])
def test_clustering_finds_the_obvious_clusters(method: str) -> None:
    p, truth = confusable_probabilities()
    clusters, primary = cluster_classes(probability_covariance(p), 3, method)
    assert clusters == [[0, 1], [2, 3], [4, 5]]
    assert primary == [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(truth, primary) == 1.0


def test_overlap_lets_a_class_join_a_second_cluster() -> None:
    p, _ = confusable_probabilities()
    cov = probability_covariance(p)
    disjoint, _ = cluster_classes(cov, 3, overlap=0.0)
    assert sum(len(c) for c in disjoint) == 6
    everything, _ = cluster_classes(cov, 3, overlap=1e6)
    assert everything == [list(range(6))] * 3


def test_overlap_share_adds_a_class_to_each_group_it_is_confused_with() -> None:
    # Eight pairs; on extra examples the model hesitates between 15 and 0, so each co-varies with
    # the other's pair too. Centre distances miss it (a class's own variance dominates its
    # column); the share of its confusions does not.
    p, truth = confusable_probabilities(8000, pairs=8)
    share = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    bridge = torch.full((1000, 16), 0.01)
    bridge[:, 15] += 0.84 * share
    bridge[:, 0] += 0.84 * (1 - share)
    cov = probability_covariance(torch.cat([p, bridge / bridge.sum(dim=1, keepdim=True)]))
    plain, primary = cluster_classes(cov, 8)
    assert plain == [[2 * i, 2 * i + 1] for i in range(8)] and primary == truth
    assert cluster_classes(cov, 8, overlap=0.2)[0] == plain
    shared, _ = cluster_classes(cov, 8, share=0.2)
    assert sorted(shared) == [[0, 1, 15], [0, 14, 15], *plain[1:7]]
    shares = confusion_shares(cov, primary, 8)
    assert shares.shape == (16, 8) and np.allclose(shares.sum(axis=1), 1)


def test_cross_modes_put_a_class_among_another_superclass() -> None:
    cfg = OmegaConf.load("conf/dataset/hierarchical.yaml")
    small = {"n_super": 4, "n_sub": 3, "dim": 8, "train_per_class": 50, "test_per_class": 2}
    cfg = OmegaConf.merge(cfg, small, {"super_spread": 10.0})
    home = load_dataset(cfg)
    # A config written before cross_modes existed gives the same data as cross_modes=0.
    old = OmegaConf.create({k: v for k, v in cfg.items() if k != "cross_modes"})
    assert load_dataset(old).fingerprint == home.fingerprint

    def class_means(data) -> torch.Tensor:
        return torch.stack([data.x_train[data.y_train == c].mean(dim=0) for c in range(12)])

    # Superclass centres (the same draws come first whatever cross_modes is), from the classes
    # that stayed home; with cross_modes=1 every class lies near another superclass's centre.
    supers = class_means(home).view(4, 3, -1).mean(dim=1)
    for cross, moved in ((0.0, 0), (1.0, 12)):
        data = load_dataset(OmegaConf.merge(cfg, {"cross_modes": cross}))
        nearest = torch.cdist(class_means(data), supers).argmin(dim=1)
        assert int((nearest != torch.arange(12) // 3).sum()) == moved
        assert data.superclass == home.superclass  # a class keeps its own superclass


def test_hierarchical_dataset_records_superclasses_and_is_deterministic() -> None:
    cfg = OmegaConf.load("conf/dataset/hierarchical.yaml")
    small = {"n_super": 3, "n_sub": 2, "train_per_class": 10, "test_per_class": 4, "dim": 5}
    cfg = OmegaConf.merge(cfg, small)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.num_classes == 6 and a.superclass == [0, 0, 1, 1, 2, 2]
    assert a.fingerprint == b.fingerprint and len(a.y_test) == 24 and a.input_shape == (5,)
    assert load_dataset(OmegaConf.merge(cfg, {"seed": 1})).fingerprint != a.fingerprint


# --- dustbin and the logit correction --------------------------------------------------------


def test_dustbin_targets_and_collapse() -> None:
    y = torch.tensor([0, 3, 5, 1, 4])
    assert dustbin_targets(y, [3, 1], 6).tolist() == [2, 0, 2, 1, 2]
    log_p = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    collapsed = collapse(log_p, [2, 0]).exp()
    assert torch.allclose(collapsed, torch.tensor([[0.3, 0.1, 0.6]]))
    assert torch.allclose(specialist_view(log_p, [2, 0]).exp(), collapsed)  # full softmax
    head = torch.tensor([[1.0, 2.0, 3.0]])  # a dustbin head: already S + dustbin
    assert torch.allclose(specialist_view(head, [2, 0]), F.log_softmax(head, dim=1))


def test_specialist_starts_from_the_generalist_and_its_dustbin_holds_the_rest() -> None:
    torch.manual_seed(0)
    generalist = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    spec = specialist_from(generalist, [1, 4], full=False)
    x = torch.randn(20, 4)
    assert spec(x).shape == (20, 3)
    assert torch.equal(spec[0].weight, generalist[0].weight)  # the body is the generalist's
    assert torch.allclose(spec(x)[:, :2], generalist(x)[:, [1, 4]])
    assert specialist_from(generalist, [1, 4], full=True)(x).shape == (20, 6)
    correct_dustbin(spec, [1, 4], False, 2.5)
    assert torch.allclose(spec(x)[:, 2] - 2.5, specialist_from(generalist, [1, 4], False)(x)[:, 2])


def test_batches_are_half_special_half_rest() -> None:
    special, rest = torch.arange(0, 30), torch.arange(30, 300)
    batches = half_and_half_batches(special, rest, 10, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches)[torch.cat(batches) < 30].tolist()) == list(range(30))
    for b in batches:
        assert (b < 30).sum() == (b >= 30).sum() == 5


def test_oversampling_factor_and_its_correction() -> None:
    assert oversampling_factor(50, 100) == 1.0  # already balanced: no correction
    assert oversampling_factor(10, 100) == pytest.approx(9.0)
    assert oversampling_factor(10, 100, share=0.1) == pytest.approx(1.0)


def train_prior(n_special: int, n_total: int) -> torch.Tensor:
    """A bias-only specialist (the input carries no information) trained on half-and-half
    batches: it can only learn the class frequencies it was shown. Returns its logits."""
    torch.manual_seed(0)
    model = nn.Linear(1, 2)  # [special, dustbin]
    y = torch.cat([torch.zeros(n_special), torch.ones(n_total - n_special)]).long()
    special, rest = torch.nonzero(y == 0).flatten(), torch.nonzero(y == 1).flatten()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n_total, 1)
    for _ in range(100):
        for b in half_and_half_batches(special, rest, 2 * n_special, g):
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model(torch.zeros(1, 1)).detach()[0]


def test_the_correction_undoes_the_oversampling() -> None:
    # 100 of 1000 examples are special: trained on balanced batches, the specialist thinks
    # they are half; log(oversampling factor) on the dustbin logit gives back 10%.
    logits = train_prior(100, 1000)
    assert abs(float(logits[1] - logits[0])) < 0.1  # it learned 50/50
    shift = math.log(oversampling_factor(100, 1000))
    assert shift == pytest.approx(math.log(9))
    corrected = F.softmax(logits + torch.tensor([0.0, shift]), dim=0)
    assert float(corrected[0]) == pytest.approx(0.1, abs=0.01)
    # Balanced data: half-and-half batches are the data's own frequencies; nothing to undo.
    balanced = train_prior(500, 1000)
    assert float(F.softmax(balanced, dim=0)[0]) == pytest.approx(0.5, abs=0.02)
    assert math.log(oversampling_factor(500, 1000)) == 0.0


# --- the KL combination ----------------------------------------------------------------------


def random_case(seed: int, n: int = 4, c: int = 3, clusters=None):
    g = torch.Generator().manual_seed(seed)
    clusters = clusters or [[0], [1, 2]]
    log_pg = F.log_softmax(2 * torch.randn(n, c, generator=g), dim=1)
    views = [F.log_softmax(2 * torch.randn(n, len(s) + 1, generator=g), dim=1) for s in clusters]
    active = torch.rand(n, len(clusters), generator=g) < 0.7
    active[0] = True
    return log_pg, clusters, views, active


def grid_minimum(log_pg, clusters, views, active, steps: int = 300):
    """The objective's minimum over a dense grid of the 3-class simplex, example by example."""
    ticks = torch.linspace(1e-4, 1 - 1e-4, steps, dtype=torch.float64)
    a, b = torch.meshgrid(ticks, ticks, indexing="ij")
    keep = a + b < 1
    q = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], dim=1)
    best = []
    for i in range(len(log_pg)):

        def rows(t: torch.Tensor, i: int = i) -> torch.Tensor:
            return t[i : i + 1].expand(len(q), -1)

        values = objective(q.log(), rows(log_pg), clusters, [rows(v) for v in views], rows(active))
        best.append((values.min(), q[values.argmin()]))
    return best


OVERLAPPING = [[0, 1], [1, 2], [0, 2]]  # every class covered by two specialists


@pytest.mark.parametrize(
    ("seed", "method", "clusters"),
    list(itertools.product(range(3), ["preconditioned", "plain"], [None, OVERLAPPING])),
)
def test_combination_matches_a_brute_force_minimiser(seed: int, method: str, clusters) -> None:
    log_pg, clusters, views, active = random_case(seed, clusters=clusters)
    log_q, steps = combine_kl(log_pg, clusters, views, active, 1e-8, 100000, method)
    assert steps < 100000
    ours = objective(log_q.double(), log_pg, clusters, views, active)
    for i, (value, q) in enumerate(grid_minimum(log_pg, clusters, views, active)):
        assert float(ours[i]) <= float(value) + 1e-6  # never worse than the best grid point
        assert torch.allclose(log_q[i].exp().double(), q, atol=5e-3)


def test_combination_matches_lbfgs_on_more_classes() -> None:
    log_pg, clusters, views, active = random_case(7, n=6, c=7, clusters=[[0, 1], [2, 3, 4], [4, 5]])
    log_q, _ = combine_kl(log_pg, clusters, views, active, 1e-10, 100000)
    z = log_pg.double().clone().requires_grad_()
    opt = torch.optim.LBFGS([z], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(F.log_softmax(z, dim=1), log_pg, clusters, views, active).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(log_q.exp().double(), F.softmax(z, dim=1).detach(), atol=1e-4)


def test_closed_forms() -> None:
    log_pg, clusters, views, active = random_case(3, n=5, c=4, clusters=[[0, 1], [2]])
    # No active specialist: the generalist's distribution comes back unchanged.
    log_q, steps = combine_kl(log_pg, clusters, views, torch.zeros_like(active))
    assert steps == 1 and torch.allclose(log_q, log_pg, atol=1e-6)
    # A specialist that agrees with the generalist's collapsed view changes nothing either.
    agreeing = [collapse(log_pg, s) for s in clusters]
    log_q, _ = combine_kl(log_pg, clusters, agreeing, active)
    assert torch.allclose(log_q, log_pg, atol=1e-5)
    # A "specialist" over every class (empty dustbin) is a second full model: the minimiser of
    # KL(p1 || q) + KL(p2 || q) is the arithmetic mean (p1 + p2) / 2.
    p2 = F.log_softmax(torch.randn(5, 4), dim=1)
    everything = [[0, 1, 2, 3]]
    full_view = torch.cat([p2, torch.full((5, 1), -1e9)], dim=1)
    log_q, _ = combine_kl(log_pg, everything, [full_view], torch.ones(5, 1, dtype=torch.bool), 1e-9)
    assert torch.allclose(log_q.exp(), (log_pg.exp() + p2.exp()) / 2, atol=1e-5)


def test_active_specialists_follow_the_generalists_top_classes() -> None:
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]]))
    clusters = [[0], [1, 2], [3], [0, 3]]
    assert active_specialists(log_p, clusters, 1).tolist() == [
        [True, False, False, True],
        [False, False, True, True],
    ]
    assert active_specialists(log_p, clusters, 2).tolist() == [
        [True, True, False, True],
        [False, True, True, True],
    ]


def test_top_n_activates_every_specialist_covering_one_of_the_top_classes() -> None:
    # With overlapping sets and the top two classes, all three specialists are active on an
    # example; the combination with all of them active is still the brute-force minimum.
    log_pg, clusters, views, _ = random_case(4, n=6, clusters=OVERLAPPING)
    active = active_specialists(log_pg, clusters, 2)
    assert active.all()  # any two of three classes meet every set
    log_q, _ = combine_kl(log_pg, clusters, views, active, 1e-8, 100000)
    for i, (value, q) in enumerate(grid_minimum(log_pg, clusters, views, active)):
        assert float(objective(log_q.double(), log_pg, clusters, views, active)[i]) <= value + 1e-6
        assert torch.allclose(log_q[i].exp().double(), q, atol=5e-3)


def test_by_coverage_counts_rows_and_leaves_an_undefined_change_undefined() -> None:
    from distillrun.stages.evaluate import by_coverage, relative

    covering = torch.tensor([0, 0, 1, 1, 1, 1, 3])
    generalist = torch.tensor([False, False, True, True, False, False, True])
    combined = torch.tensor([True, False, True, True, True, False, True])
    rows = by_coverage(covering, generalist, combined)
    assert [(r["covering"], r["examples"], r["gained"]) for r in rows] == [
        (0, 2, 1),
        (1, 4, 1),
        (3, 1, 0),
    ]
    # +1 correct where the generalist had none: not "+0.0%" but n/a
    assert rows[0]["relative_change"] is None and relative(None) == "n/a"
    assert rows[1]["relative_change"] == pytest.approx(0.5) and relative(0.5) == "+50.0%"
