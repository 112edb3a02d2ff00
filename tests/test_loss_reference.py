"""DKD, DIST, NKD and logit standardisation against their published formulas.

Each reference below is written the way the paper's published code states the loss, from the
teacher's raw logits (one teacher), in plain tensor code; the package's function receives the
teacher's log-probabilities instead. Values and gradients with respect to the student's logits
must agree in float64. The identities are the papers' own.
"""

import pytest
import torch
import torch.nn.functional as F

from distillrun.method.losses import (
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    nkd_loss,
    nkd_terms,
    soft_loss,
    standardize,
    warmup_weight,
)

# (seed, batch, classes, temperature)
CASES = [(0, 16, 10, 4.0), (1, 64, 100, 4.0), (2, 32, 37, 1.0), (3, 48, 10, 2.5)]


def random_problem(seed, n, c, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=dtype) * scale
    v = torch.randn(n, c, generator=g, dtype=dtype) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return z, v, y


def value_and_grad(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss = loss_fn(z)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def assert_same_loss(package_fn, reference_fn, z):
    value, grad = value_and_grad(package_fn, z)
    ref_value, ref_grad = value_and_grad(reference_fn, z)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


# --- logit standardisation (Sun et al. 2024) ------------------------------------------------


def published_normalize(z):
    """(z - mean) / (1e-7 + std), std with Bessel's correction (torch.std's default)."""
    mean = z.sum(-1, keepdim=True) / z.shape[-1]
    std = (((z - mean) ** 2).sum(-1, keepdim=True) / (z.shape[-1] - 1)).sqrt()
    return (z - mean) / (1e-7 + std)


def published_ls_kd(z, v, T):
    """The published kd_loss with logit_stand: both sides normalised, KL summed, T^2."""
    log_q = F.log_softmax(published_normalize(z) / T, dim=1)
    p = F.softmax(published_normalize(v) / T, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(1).mean() * T**2


@pytest.mark.parametrize("seed,n,c,T", CASES)
def test_standardize_matches_the_published_normalize(seed, n, c, T):
    z, v, _ = random_problem(seed, n, c)
    w = torch.randn(n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 99))
    assert_same_loss(
        lambda z: (standardize(z) * w).sum(), lambda z: (published_normalize(z) * w).sum(), z
    )
    log_p = F.log_softmax(standardize(v) / T, dim=1)
    assert_same_loss(
        lambda z: soft_loss(standardize(z), log_p, T), lambda z: published_ls_kd(z, v, T), z
    )


def test_standardized_logits_have_mean_0_and_std_1():
    z, _, _ = random_problem(5, 32, 100, scale=7.0)
    s = standardize(z + 3.0)
    torch.testing.assert_close(s.mean(dim=1), torch.zeros(32, dtype=torch.float64))
    torch.testing.assert_close(s.std(dim=1), torch.ones(32, dtype=torch.float64))


def test_kd_on_standardized_logits_ignores_shift_and_scale_per_example():
    z, v, _ = random_problem(6, 24, 10)
    g = torch.Generator().manual_seed(7)
    scale_z, scale_v = (torch.rand(24, 1, generator=g, dtype=torch.float64) * 4 + 0.5 for _ in "zv")
    shift_z, shift_v = (torch.randn(24, 1, generator=g, dtype=torch.float64) * 10 for _ in "zv")
    T = 2.0

    def ls_kd(z, v):
        return soft_loss(standardize(z), F.log_softmax(standardize(v) / T, dim=1), T)

    moved = ls_kd(z * scale_z + shift_z, v * scale_v + shift_v)
    torch.testing.assert_close(moved, ls_kd(z, v), rtol=1e-6, atol=1e-6)
    # ...while plain KD does depend on the scale.
    assert (
        abs(
            soft_loss(z * scale_z, F.log_softmax(v / T, 1), T)
            - soft_loss(z, F.log_softmax(v / T, 1), T)
        )
        > 0.1
    )


# --- DKD (Zhao et al. 2022) ---------------------------------------------------------------------


def published_dkd(z, v, y, alpha, beta, T):
    """mdistiller's dkd_loss: masks by multiplying, logs of summed softmaxes, -1000 * gt_mask."""
    gt = torch.zeros_like(z).scatter_(1, y[:, None], 1).bool()
    other = torch.ones_like(z).scatter_(1, y[:, None], 0).bool()

    def target_and_rest(probs):
        return torch.cat(
            [(probs * gt).sum(1, keepdim=True), (probs * other).sum(1, keepdim=True)], 1
        )

    q_bin = target_and_rest(F.softmax(z / T, dim=1))
    p_bin = target_and_rest(F.softmax(v / T, dim=1))
    tckd = F.kl_div(torch.log(q_bin), p_bin, reduction="sum") * T**2 / y.shape[0]
    p_rest = F.softmax(v / T - 1000.0 * gt, dim=1)
    log_q_rest = F.log_softmax(z / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_rest, p_rest, reduction="sum") * T**2 / y.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("seed,n,c,T", CASES)
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_the_published_code(seed, n, c, T, alpha, beta):
    z, v, y = random_problem(seed, n, c)
    log_p = F.log_softmax(v / T, dim=1)
    assert_same_loss(
        lambda z: dkd_loss(z, log_p, y, T, alpha, beta),
        lambda z: published_dkd(z, v, y, alpha, beta, T),
        z,
    )


@pytest.mark.parametrize("seed,n,c,T", CASES)
def test_dkd_decomposes_kd(seed, n, c, T):
    # KL(p || q) = TCKD + (1 - p_t) * NCKD per example, so T^2 times its mean is soft_loss.
    z, v, y = random_problem(seed, n, c)
    log_p = F.log_softmax(v / T, dim=1)
    tckd, nckd = dkd_terms(z, log_p, y, T)
    p_t = log_p.exp().gather(1, y[:, None]).squeeze(1)
    kl = (log_p.exp() * (log_p - F.log_softmax(z / T, dim=1))).sum(1)
    torch.testing.assert_close(tckd + (1 - p_t) * nckd, kl)
    reweighted = T * T * (tckd + (1 - p_t) * nckd).mean()
    torch.testing.assert_close(reweighted, soft_loss(z, log_p, T))


def test_dkd_takes_label_distributions_as_their_most_likely_class():
    z, v, y = random_problem(8, 16, 10)
    log_p = F.log_softmax(v / 4, dim=1)
    mixed = 0.7 * F.one_hot(y, 10).double() + 0.3 * F.one_hot(y.roll(1), 10).double()
    assert dkd_loss(z, log_p, mixed, 4.0) == dkd_loss(z, log_p, y, 4.0)


def test_dkd_warmup_is_linear_from_epoch_1():
    assert [warmup_weight(e, 20) for e in (1, 10, 20, 21, 200)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    assert warmup_weight(1, 0) == 1.0


# --- DIST (Huang et al. 2022) -------------------------------------------------------------------


def published_dist(z, v, beta, gamma, tau):
    """DIST: 1 - mean Pearson correlation (cosine of centred vectors, eps on the norms), rows
    (inter-class) and columns (intra-class), each times tau^2."""

    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = (z / tau).softmax(dim=1), (v / tau).softmax(dim=1)
    inter = tau**2 * (1 - pearson(y_s, y_t).mean())
    intra = tau**2 * (1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra


@pytest.mark.parametrize("seed,n,c,T", CASES)
@pytest.mark.parametrize("beta,gamma", [(2.0, 2.0), (1.0, 3.0)])
def test_dist_matches_the_published_code(seed, n, c, T, beta, gamma):
    z, v, _ = random_problem(seed, n, c)
    log_p = F.log_softmax(v / T, dim=1)
    assert_same_loss(
        lambda z: dist_loss(z, log_p, T, beta, gamma),
        lambda z: published_dist(z, v, beta, gamma, T),
        z,
    )


def test_dist_is_zero_for_perfectly_correlated_probabilities():
    # Pearson correlation ignores a positive scale and a shift: a student whose probabilities
    # are a * p + (1 - a) / C (a valid distribution, far from p in KL) loses nothing.
    _, v, _ = random_problem(9, 32, 10)
    T, a = 4.0, 0.3
    p = F.softmax(v / T, dim=1)
    z = T * torch.log(a * p + (1 - a) / 10)
    log_p = p.log()
    assert soft_loss(z, log_p, T) > 0.1
    # zero but for the code's eps (1e-8 added to products of norms of order 1e-2)
    assert dist_loss(z, log_p, T) < 1e-3
    assert dist_loss(v, log_p, T) < 1e-3  # the student's logits are the teacher's
    assert dist_loss(-v, log_p, T) > 1.0


def test_dist_with_a_batch_of_one_has_intra_1_and_finite_gradients():
    z, v, _ = random_problem(10, 1, 10)
    log_p = F.log_softmax(v / 4, dim=1)
    inter, intra = dist_terms(z, log_p, 4.0)
    assert intra.item() == 1.0
    value, grad = value_and_grad(lambda z: dist_loss(z, log_p, 4.0), z)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, 16 * (2 * inter + 2 * 1.0))


# --- NKD (Yang et al. 2023) ---------------------------------------------------------------------


def published_nkd(z, v, y, temp, gamma):
    """cls_KD's NKDLoss (after its masking fix): -t_t log s_t at temperature 1, plus
    -gamma * temp^2 * sum T_i log S_i over the non-target logits re-softmaxed at temp."""
    n, c = z.shape
    label = y.view(n, 1)
    s_t = torch.gather(F.log_softmax(z, dim=1), 1, label)
    t_t = torch.gather(F.softmax(v, dim=1), 1, label)
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(z).scatter_(1, label, 0).bool()
    z_rest, v_rest = z[mask].reshape(n, -1), v[mask].reshape(n, -1)
    S = F.log_softmax(z_rest / temp, dim=1)
    T_ = F.softmax(v_rest / temp, dim=1)
    return loss_t - gamma * temp**2 * (T_ * S).sum(dim=1).mean()


@pytest.mark.parametrize("seed,n,c,T", CASES)
@pytest.mark.parametrize("gamma", [1.5, 3.5])
def test_nkd_matches_the_published_code(seed, n, c, T, gamma):
    z, v, y = random_problem(seed, n, c)
    log_p1, log_pT = F.log_softmax(v, dim=1), F.log_softmax(v / T, dim=1)
    assert_same_loss(
        lambda z: nkd_loss(z, log_p1, log_pT, y, T, gamma),
        lambda z: published_nkd(z, v, y, T, gamma),
        z,
    )


@pytest.mark.parametrize("seed,n,c,T", CASES)
def test_nkd_terms_decompose_the_soft_cross_entropy(seed, n, c, T):
    # The paper's starting point, at temperature 1 and per example:
    # -sum_i p_i log q_i = -p_t log q_t - (1 - p_t) log(1 - q_t) + (1 - p_t) * CE(p_hat, q_hat).
    # NKD keeps the first term, drops the second and puts gamma in place of (1 - p_t).
    z, v, y = random_problem(seed, n, c)
    log_p = F.log_softmax(v, dim=1)
    target, non_target = nkd_terms(z, log_p, log_p, y, 1.0)
    p_t = log_p.exp().gather(1, y[:, None]).squeeze(1)
    q_t = F.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    soft_ce = -(log_p.exp() * F.log_softmax(z, dim=1)).sum(1)
    torch.testing.assert_close(
        target - (1 - p_t) * torch.log1p(-q_t) + (1 - p_t) * non_target, soft_ce
    )


def test_nkd_takes_label_distributions_as_their_most_likely_class():
    z, v, y = random_problem(11, 16, 10)
    log_p1, log_pT = F.log_softmax(v, dim=1), F.log_softmax(v / 3, dim=1)
    mixed = 0.6 * F.one_hot(y, 10).double() + 0.4 * F.one_hot(y.roll(1), 10).double()
    assert nkd_loss(z, log_p1, log_pT, mixed, 3.0) == nkd_loss(z, log_p1, log_pT, y, 3.0)


# --- extremes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "loss",
    [
        lambda z, v, y, T: dkd_loss(z, F.log_softmax(v / T, 1), y, T),
        lambda z, v, y, T: dist_loss(z, F.log_softmax(v / T, 1), T),
        lambda z, v, y, T: nkd_loss(z, F.log_softmax(v, 1), F.log_softmax(v / T, 1), y, T),
        lambda z, v, y, T: soft_loss(standardize(z), F.log_softmax(standardize(v) / T, 1), T),
    ],
    ids=["dkd", "dist", "nkd", "standardized_kd"],
)
def test_extreme_logits_stay_finite(loss, dtype):
    z, v, y = random_problem(12, 32, 100, scale=100.0, dtype=dtype)
    # the student is certain and wrong on the label, the teacher certain and right
    z.scatter_(1, y[:, None], -1000.0)
    v.scatter_(1, y[:, None], 1000.0)
    for T in (1.0, 4.0):
        value, grad = value_and_grad(lambda z, T=T: loss(z, v, y, T), z)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
