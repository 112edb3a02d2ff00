"""The distillation loss and the ensemble combinations against the paper's formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillrun.method.ensemble import combine
from distillrun.method.losses import distillation_loss, logit_mse, soft_loss


def grad_wrt_logits(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3), (2.5, 1.0), (3.0, 0.0)])
def test_gradient_matches_the_paper(T, alpha):
    g = torch.Generator().manual_seed(0)
    n, c = 7, 10
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    v = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    log_p_T = F.log_softmax(v / T, dim=1)

    grad = grad_wrt_logits(lambda z: distillation_loss(z, log_p_T, y, T, alpha), z)

    q_T, p_T, q_1 = F.softmax(z / T, 1), log_p_T.exp(), F.softmax(z, 1)
    onehot = F.one_hot(y, c).double()
    # Per example: alpha * T * (q_T - p_T) + (1 - alpha) * (q_1 - y); the loss averages over n.
    expected = (alpha * T * (q_T - p_T) + (1 - alpha) * (q_1 - onehot)) / n
    torch.testing.assert_close(grad, expected)


def test_soft_term_is_a_kl_over_classes_not_a_mean():
    # KLDivLoss(reduction="mean") would also divide by the number of classes.
    z = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    v = torch.tensor([[0.0, 1.0, 0.0, -2.0]])
    T = 2.0
    p, log_q = F.softmax(v / T, 1), F.log_softmax(z / T, 1)
    kl = (p * (p.log() - log_q)).sum()
    assert soft_loss(z, F.log_softmax(v / T, 1), T).item() == pytest.approx(T * T * kl.item())


def test_no_labels_keeps_the_soft_term_with_its_T_squared():
    z, v = torch.randn(5, 6), torch.randn(5, 6)
    log_p = F.log_softmax(v / 8, 1)
    assert distillation_loss(z, log_p, None, 8.0, 0.3).item() == pytest.approx(
        soft_loss(z, log_p, 8.0).item()
    )
    assert soft_loss(z, log_p, 8.0).item() == pytest.approx(
        64 * F.kl_div(F.log_softmax(z / 8, 1), log_p, log_target=True, reduction="batchmean").item()
    )


def test_high_temperature_limit_is_logit_matching():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 10, generator=g, dtype=torch.float64)
    v = torch.randn(4, 10, generator=g, dtype=torch.float64)
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    mse_grad = grad_wrt_logits(lambda z: logit_mse(z, v), z)
    # (z_i - v_i) / (N T^2) per the paper, times T^2 from the loss's scaling, over 4 examples.
    torch.testing.assert_close(mse_grad, (z - v) / (10 * 4))
    for T, tol in ((10.0, 0.15), (100.0, 0.01), (1000.0, 0.001)):  # error shrinks as 1/T
        kd_grad = grad_wrt_logits(
            lambda z, T=T: distillation_loss(z, F.log_softmax(v / T, 1), None, T, 1.0), z
        )
        rel = (kd_grad - mse_grad).norm() / mse_grad.norm()
        assert rel < tol, (T, rel)


def test_logit_mse_ignores_a_per_example_shift():
    z, v = torch.randn(3, 5), torch.randn(3, 5)
    assert logit_mse(z + 7.0, v - 3.0).item() == pytest.approx(logit_mse(z, v).item(), abs=1e-5)
    assert logit_mse(v, v).item() == pytest.approx(0.0, abs=1e-7)


def test_arithmetic_and_geometric_means_by_hand():
    # Two members, one example, two classes: probabilities (0.9, 0.1) and (0.5, 0.5).
    logits = torch.tensor([[[math.log(0.9), math.log(0.1)]], [[0.0, 0.0]]])
    arithmetic = combine(logits, "arithmetic").exp()
    torch.testing.assert_close(arithmetic, torch.tensor([[0.7, 0.3]]))
    g = torch.tensor([math.sqrt(0.9 * 0.5), math.sqrt(0.1 * 0.5)])
    torch.testing.assert_close(combine(logits, "geometric").exp(), (g / g.sum())[None])


def test_geometric_mean_at_T_is_softmax_of_mean_logits_and_arithmetic_is_not():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 8, 10, generator=g) * 4
    T = 3.0
    expected = F.log_softmax(logits.mean(0) / T, dim=1)
    torch.testing.assert_close(combine(logits, "geometric", T), expected)
    arithmetic = combine(logits, "arithmetic", T)
    torch.testing.assert_close(arithmetic.exp(), F.softmax(logits / T, dim=2).mean(0))
    assert not torch.allclose(arithmetic, expected, atol=1e-3)


def test_single_member_ensemble_is_the_member():
    logits = torch.randn(1, 6, 4)
    for method in ("arithmetic", "geometric"):
        torch.testing.assert_close(combine(logits, method, 2.0), F.log_softmax(logits[0] / 2, 1))
    with pytest.raises(ValueError):
        combine(logits, "median")
