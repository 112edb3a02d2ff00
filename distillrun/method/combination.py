"""Generalist-plus-specialists inference: the paper's KL combination, for a whole batch at once.

For each example, q = softmax(z) minimises

    KL(p_g || q) + sum over active specialists m of KL(p_m || collapse_m(q))

where collapse_m(q) keeps q on the classes S^m and gives the dustbin the sum of q over the
rest. There is no closed form, so z is found by gradient descent from z = log p_g.

The gradient in z has a simple form: (1 + |A|) q - t, with
    t_i = p_g,i + sum_{m active, i in S^m} p_m,i + q_i * sum_{m active, i not in S^m} p_m,dust / d_m
and d_m = sum of q outside S^m. It costs two [N, K] x [K, C] products per step for the whole
batch. Each example's step is 1 / (1 + its number of active specialists), the inverse of the
objective's curvature bound in z (each KL term's Hessian is at most the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_TINY = 1e-300


def membership(clusters: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """[K, C] float: 1 where class c is in S^m."""
    member = torch.zeros(len(clusters), num_classes, dtype=torch.float64)
    for m, classes in enumerate(clusters):
        member[m, list(classes)] = 1.0
    return member


def active_specialists(
    generalist_log_p: torch.Tensor, clusters: Sequence[Sequence[int]], n: int = 1
) -> torch.Tensor:
    """[N, K] bool: specialist m is active on an example when S^m holds one of the generalist's
    n most probable classes for it."""
    top = generalist_log_p.topk(min(n, generalist_log_p.shape[-1]), dim=-1).indices  # [N, n]
    member = membership(clusters, generalist_log_p.shape[-1]).bool().to(top.device)
    return member[:, top].any(dim=-1).T  # [K, N, n] -> [N, K]


def _prepare(
    generalist_log_p: torch.Tensor,
    clusters: Sequence[Sequence[int]],
    specialist_log_p: Sequence[torch.Tensor],
    active: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Dense float64 pieces: p_g [N, C], specialists' class probabilities scattered into
    [N, C] summed over active ones, their dustbin probabilities [N, K], membership [K, C],
    activity [N, K]."""
    device = generalist_log_p.device
    p_g = F.softmax(generalist_log_p.double(), dim=-1)
    n, c = p_g.shape
    member = membership(clusters, c).to(device)
    act = active.double().to(device)
    special = torch.zeros(n, c, dtype=torch.float64, device=device)
    dust = torch.zeros(n, len(clusters), dtype=torch.float64, device=device)
    for m, (classes, log_p) in enumerate(zip(clusters, specialist_log_p, strict=True)):
        p = F.softmax(log_p.double().to(device), dim=-1)
        special[:, list(classes)] += act[:, m : m + 1] * p[:, :-1]
        dust[:, m] = p[:, -1]
    return p_g, special, dust, member, act


def objective(
    log_q: torch.Tensor,
    generalist_log_p: torch.Tensor,
    clusters: Sequence[Sequence[int]],
    specialist_log_p: Sequence[torch.Tensor],
    active: torch.Tensor,
) -> torch.Tensor:
    """Per example [N]: KL(p_g || q) + sum_m active_m * KL(p_m || collapse_m(q))."""

    def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (torch.xlogy(p, p) - torch.xlogy(p, r.clamp_min(_TINY))).sum(dim=-1)

    q = log_q.double().exp()
    p_g = F.softmax(generalist_log_p.double(), dim=-1)
    total = kl(p_g, q)
    for m, (classes, log_p) in enumerate(zip(clusters, specialist_log_p, strict=True)):
        q_s = q[:, list(classes)]
        collapsed = torch.cat([q_s, (1 - q_s.sum(dim=-1, keepdim=True)).clamp_min(0)], dim=-1)
        total = total + active[:, m].double() * kl(F.softmax(log_p.double(), -1), collapsed)
    return total


def combine_kl(
    generalist_log_p: torch.Tensor,
    clusters: Sequence[Sequence[int]],
    specialist_log_p: Sequence[torch.Tensor],
    active: torch.Tensor,
    tolerance: float = 1e-5,
    max_iter: int = 5000,
    method: str = "preconditioned",
) -> tuple[torch.Tensor, int]:
    """log q [N, C] for every example, and the number of descent steps taken.

    `specialist_log_p[m]` is specialist m's [N, |S^m| + 1] log-probabilities (dustbin last),
    `active` [N, K] says where it takes part. Descent stops once every gradient entry is below
    `tolerance` (or after `max_iter` steps). An example with no active specialist keeps
    q = p_g exactly: its gradient is zero from the start.
    """
    p_g, special, dust, member, act = _prepare(generalist_log_p, clusters, specialist_log_p, active)
    outside = 1 - member
    weight = 1 + act.sum(dim=1, keepdim=True)  # 1 + |A| per example
    fixed = p_g + special
    z = torch.log(p_g.clamp_min(_TINY))
    steps = 0
    while steps < max_iter:
        steps += 1
        q = F.softmax(z, dim=-1)
        d = (q @ outside.T).clamp_min(_TINY)  # [N, K]: q's mass in each dustbin
        t = fixed + q * ((act * dust / d) @ outside)
        grad = weight * q - t
        if grad.abs().max() < tolerance:
            break
        if method == "plain":
            z -= grad / weight
        else:  # z_i -= grad_i / (weight q_i), taken in log space so that q stays positive
            z = torch.log(t.clamp_min(_TINY) / weight)
    return F.log_softmax(z, dim=-1).float(), steps
