"""The distillation objective of Hinton, Vinyals and Dean (2015), logit matching, and the
later logit losses DKD, DIST and NKD with logit standardisation (each function names its paper);
at the end, LOSSES: the term of each `loss=` (conf/loss/<name>.yaml) as `distill` calls it.

`alpha` weights the soft term, as in the paper:
    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)
KL and the soft cross-entropy differ by the teacher's entropy, a constant, so their gradients
agree: d loss / d z_i = alpha * T * (q_T,i - p_T,i) + (1 - alpha) * (q_1,i - y_i).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distillrun.method.ensemble import combine


def soft_loss(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, T: float
) -> torch.Tensor:
    """T^2 * KL(p_T || q_T), summed over classes and averaged over examples.

    `teacher_log_probs` are the teacher's log-probabilities already at temperature T.
    """
    log_q = F.log_softmax(student_logits / T, dim=1)
    # "batchmean", not "mean": "mean" would also divide by the number of classes.
    kl = F.kl_div(log_q, teacher_log_probs, log_target=True, reduction="batchmean")
    return T * T * kl


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor | None,
    T: float,
    alpha: float,
) -> torch.Tensor:
    """The paper's loss: alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, q_1).

    student_logits [N, C]: the student's raw logits (at T = 1; divided by T here).
    teacher_log_probs [N, C]: the teacher's *log-probabilities at temperature T*, not its
        logits: e.g. `combine(member_logits, "arithmetic", T)`, or
        `log_softmax(teacher_logits / T, dim=1)` for one teacher.
    labels [N] (class ids) or None: None (an unlabeled transfer set) keeps the soft term only.
    T > 0; alpha in [0, 1] weights the *soft* term, as in the paper (alpha=0: hard labels
        only). Some tools use the opposite convention.
    Returns the mean over the N examples (a scalar).
    """
    soft = soft_loss(student_logits, teacher_log_probs, T)
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1 - alpha) * hard


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Squared error between zero-meaned logits, 1/(2N) sum over the N classes, mean over examples.

    This is the high-temperature limit of `soft_loss` (Caruana et al.'s logit matching), so the
    two losses are on the same scale.
    """
    z = student_logits - student_logits.mean(dim=1, keepdim=True)
    v = teacher_logits - teacher_logits.mean(dim=1, keepdim=True)
    return (z - v).pow(2).sum(dim=1).mean() / (2 * z.shape[1])


def logit_matching_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    T: float,
    alpha: float,
) -> torch.Tensor:
    """Logit matching in place of the soft term, mixed with the hard term by alpha.

    `teacher_logits` [N, C]: any logits of the teacher's distribution at T = 1 (log-probabilities
    will do: zero-meaning removes the per-example shift). `T` is not used: logit matching is the
    high-temperature limit, so its signature matches `distillation_loss` for the LOSSES table.
    """
    soft = logit_mse(student_logits, teacher_logits)
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


# --- Losses from later papers -------------------------------------------------------------------
# Each takes the student's raw logits [N, C], the teacher's log-probabilities [N, C] at the
# temperature(s) it needs (one teacher, or an ensemble from `ensemble.combine`), the labels and
# its hyperparameters, and returns a scalar: the mean over the batch. The hard-label term and
# any schedule are the caller's.


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation",
    CVPR 2024): each example's logits z -> (z - mean(z)) / (std(z) + 1e-7), over the classes.

    As in the published code (sunshangquan/logit-standardization-KD, `normalize` in
    mdistiller/distillers/KD.py), std is the *unbiased* one (divides by C - 1) and the 1e-7 is
    added to it. The biased std would only rescale every standardised logit by sqrt(C / (C - 1)),
    which is a change of the base temperature. Both the student's and the teacher's logits are
    standardised, then used at a base temperature (published: T 2, KD weight 9, CE weight 0.1 on
    CIFAR-100). For an ensemble, standardise each member's logits before `combine`.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + 1e-7)


def warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """min(epoch / warmup_epochs, 1): DKD's linear warm-up of its loss weight, with epochs
    counted from 1 as in mdistiller (and distillrun), so the first epoch has 1 / warmup_epochs."""
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


def _class_ids(labels: torch.Tensor) -> torch.Tensor:
    """Class ids [N] from class ids or label distributions [N, C] (mixup): the most likely class,
    as NKD's published code does for distributions."""
    return labels.argmax(dim=1) if labels.ndim == 2 else labels


def _split_target(log_probs: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target class's entry [N] and the other C - 1 entries [N, C - 1] of each row."""
    n, c = log_probs.shape
    others = torch.ones_like(log_probs, dtype=torch.bool).scatter_(1, ids[:, None], False)
    return log_probs.gather(1, ids[:, None]).squeeze(1), log_probs[others].reshape(n, c - 1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row [N], from log-probabilities; a class with p = 0 adds 0."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == -math.inf, torch.zeros_like(terms), terms).sum(dim=1)


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor,
    T: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD's two parts per example (Zhao et al., "Decoupled Knowledge Distillation",
    CVPR 2022): (TCKD [N], NCKD [N]), without the T^2 factor.

    With p = the teacher's distribution at T (`teacher_log_probs`), q = softmax(z / T) and t the
    label: TCKD = KL([p_t, 1 - p_t] || [q_t, 1 - q_t]), the binary target-vs-rest KL, and
    NCKD = KL(p_hat || q_hat), where p_hat, q_hat are p, q over the C - 1 non-target classes,
    renormalised. The paper's decomposition: KL(p || q) = TCKD + (1 - p_t) * NCKD.

    Computed in log space: 1 - p_t as logsumexp of the non-target log-probabilities, and the
    renormalised distributions by dropping the target column (the published code takes log of a
    softmax and masks with "- 1000 * gt_mask", which can give log(0) for extreme logits).
    """
    ids = _class_ids(labels)
    log_q = F.log_softmax(student_logits / T, dim=1)
    p_target, p_rest = _split_target(teacher_log_probs, ids)
    q_target, q_rest = _split_target(log_q, ids)
    p_binary = torch.stack([p_target, torch.logsumexp(p_rest, dim=1)], dim=1)
    q_binary = torch.stack([q_target, torch.logsumexp(q_rest, dim=1)], dim=1)
    tckd = _kl_rows(p_binary, q_binary)
    nckd = _kl_rows(F.log_softmax(p_rest, dim=1), F.log_softmax(q_rest, dim=1))
    return tckd, nckd


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha_t: float = 1.0,
    beta_n: float = 8.0,
) -> torch.Tensor:
    """DKD (Zhao et al., CVPR 2022): T^2 * mean over examples of (alpha_t * TCKD + beta_n * NCKD),
    see `dkd_terms`; `teacher_log_probs` at temperature T.

    As in the published code (megvii-research/mdistiller, mdistiller/distillers/DKD.py), both
    terms carry T^2. Published settings (mdistiller/engine/cfg.py and configs/cifar100/dkd/):
    alpha_t 1, beta_n 8 (6 with WRN-40-2 and VGG-13 teachers, 2 with ResNet-56/110 teachers),
    T 4, cross-entropy weight 1 (the caller's), and this loss scaled by
    `warmup_weight(epoch, 20)`. ImageNet (configs/imagenet/*/dkd.yaml): T 1, beta_n 0.5
    (ResNet-34 -> ResNet-18) or 2 (ResNet-50 -> MobileNet), warm-up 1 epoch.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_log_probs, labels, T)
    return T * T * (alpha_t * tckd + beta_n * nckd).mean()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b [N]: the cosine of the
    centred rows, with eps added to the product of the norms as in DIST's code."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's two relations (Huang et al., "Knowledge Distillation from A Stronger Teacher",
    NeurIPS 2022): (inter, intra), scalars, without the T^2 factor.

    With Y_s = softmax(z / T) and Y_t the teacher's probabilities at T, both [N, C]:
    inter = 1 - mean over examples of pearson(Y_s[n, :], Y_t[n, :]) (across classes), and
    intra = 1 - mean over classes of pearson(Y_s[:, c], Y_t[:, c]) (across the batch).
    The intra term depends on the whole batch, not on each example alone. With a batch of one
    every centred column is zero, so its correlation is 0 / (0 + eps) = 0 and intra = 1, a
    constant with zero gradient.
    """
    y_s = F.softmax(student_logits / T, dim=1)
    y_t = teacher_log_probs.exp()
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.T, y_t.T).mean()
    return inter, intra


def dist_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    T: float,
    beta: float = 2.0,
    gamma: float = 2.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): T^2 * (beta * inter + gamma * intra), see `dist_terms`;
    `teacher_log_probs` at temperature T.

    The published code (hunto/image_classification_sota, lib/models/losses/dist_kd.py, which
    hunto/DIST_KD points to) builds DIST(beta=1, gamma=1, tau) and scales it by kd_loss_weight 2
    (configs/strategies/distill/dist_cifar.yaml: kd dist_t4, i.e. tau 4, CE weight 1; ImageNet
    resnet_dist.yaml: tau 1, weight 2), hence the defaults beta = gamma = 2.
    """
    inter, intra = dist_terms(student_logits, teacher_log_probs, T)
    return T * T * (beta * inter + gamma * intra)


def nkd_terms(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_log_probs_T: torch.Tensor,
    labels: torch.Tensor,
    T: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NKD's two parts per example (Yang et al., "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023):
    (target [N], non-target [N]), without gamma and T^2.

    target = -p_t * log q_t at temperature 1 (p = `teacher_log_probs`, at T = 1; q = softmax(z));
    non-target = CE(p_hat, q_hat) = -sum_{i != t} p_hat_i log q_hat_i at temperature T, where
    p_hat (from `teacher_log_probs_T`) and q_hat = softmax(z / T) are renormalised over the C - 1
    non-target classes. The two teacher inputs differ for an ensemble: an arithmetic mean at T is
    not a power of the mean at 1. It is a cross-entropy, not a KL: the value differs by the
    entropy of p_hat, the gradient does not.
    """
    ids = _class_ids(labels)
    p_target, _ = _split_target(teacher_log_probs, ids)
    q_target, _ = _split_target(F.log_softmax(student_logits, dim=1), ids)
    _, p_rest = _split_target(teacher_log_probs_T, ids)
    _, z_rest = _split_target(student_logits / T, ids)
    target = -p_target.exp() * q_target
    non_target = -(F.softmax(p_rest, dim=1) * F.log_softmax(z_rest, dim=1)).sum(dim=1)
    return target, non_target


def nkd_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_log_probs_T: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    gamma: float = 1.5,
) -> torch.Tensor:
    """NKD (Yang et al., ICCV 2023): mean over examples of target + gamma * T^2 * non-target,
    see `nkd_terms`. The code's CE weight is 1 (the student's own loss, added by the caller).

    Published code: yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py (temp 1.0, gamma 1.5 by
    default; configs/distillers/imagenet/res34_distill_res18_img.py: temp 1, gamma 1.5; DeiT:
    temp 1, gamma 1; configs/distillers/cifar100/res34_distill_res18_cifar.py: temp 3, gamma 3.5).
    Before commit 9466b3f that file (and the older mmcls/distillation/losses/nkd.py) built the
    non-target mask with the wrong fill value, keeping the target class in the second term;
    this follows the fixed version.
    """
    target, non_target = nkd_terms(
        student_logits, teacher_log_probs, teacher_log_probs_T, labels, T
    )
    return (target + gamma * T * T * non_target).mean()


# --- the distillation terms of `loss=` -----------------------------------------------------------
# `distill` trains on  alpha * term + (1 - alpha) * CE(y, q_1)  for every loss (alpha weights the
# term, as in Hinton et al.). A term is a function of
#   z [B, C]        the student's logits on the batch (standardised with loss.standardize=true),
#   teacher         the teacher ensemble on the same examples and views (`Teacher`),
#   target [B]      each example's class: its label, or without labels the teacher's top class,
#   T, epoch        the temperature and the epoch in training, from 1,
# and, keyword-only, the hyperparameters of conf/loss/<name>.yaml (same names, no defaults here:
# the YAML holds them). It returns the mean over the batch. Adding a loss: its term here and in
# LOSSES, conf/loss/<name>.yaml, and its reference test (tests/test_loss_group.py checks the pair).


@dataclass(frozen=True)
class Teacher:
    """The teacher ensemble on a batch, as a loss reads it: the members' logits [M, B, C] (each
    standardised with loss.standardize=true) and how they are combined (`ensemble=`)."""

    member_logits: torch.Tensor
    ensemble: str

    def log_probs(self, T: float) -> torch.Tensor:
        """The ensemble's log-probabilities [B, C] at temperature T (`ensemble.combine`)."""
        return combine(self.member_logits, self.ensemble, T)


def kd_term(
    z: torch.Tensor, teacher: Teacher, target: torch.Tensor, T: float, epoch: int
) -> torch.Tensor:
    """Hinton et al.: T^2 * KL(p_T || q_T) against the ensemble's distribution at T."""
    return soft_loss(z, teacher.log_probs(T), T)


def logit_mse_term(
    z: torch.Tensor, teacher: Teacher, target: torch.Tensor, T: float, epoch: int
) -> torch.Tensor:
    """Logit matching against the ensemble's log-probabilities at 1 (any logits of its
    distribution do: zero-meaning removes the per-example shift). T is not used."""
    return logit_mse(z, teacher.log_probs(1.0))


def dkd_term(
    z: torch.Tensor,
    teacher: Teacher,
    target: torch.Tensor,
    T: float,
    epoch: int,
    *,
    alpha_t: float,
    beta_n: float,
    warmup_epochs: int,
) -> torch.Tensor:
    """DKD (`dkd_loss`) weighted by its linear warm-up, `warmup_weight(epoch, warmup_epochs)`."""
    weight = warmup_weight(epoch, warmup_epochs)
    return weight * dkd_loss(z, teacher.log_probs(T), target, T, alpha_t, beta_n)


def dist_term(
    z: torch.Tensor,
    teacher: Teacher,
    target: torch.Tensor,
    T: float,
    epoch: int,
    *,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """DIST (`dist_loss`), its intra-class relation over the rows of this batch."""
    return dist_loss(z, teacher.log_probs(T), T, beta, gamma)


def nkd_term(
    z: torch.Tensor,
    teacher: Teacher,
    target: torch.Tensor,
    T: float,
    epoch: int,
    *,
    gamma: float,
) -> torch.Tensor:
    """NKD (`nkd_loss`): the target term against the ensemble at 1, the non-target one at T."""
    return nkd_loss(z, teacher.log_probs(1.0), teacher.log_probs(T), target, T, gamma)


# loss= -> its term; the names are those of conf/loss/<name>.yaml
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "kd": kd_term,
    "logit_mse": logit_mse_term,
    "dkd": dkd_term,
    "dist": dist_term,
    "nkd": nkd_term,
}
# The keys of conf/loss/<name>.yaml that are not hyperparameters of the term.
SETTINGS = ("name", "standardize")


def hyperparameters(loss: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the loss's term: its config (`cfg.loss`) less SETTINGS."""
    return {k: v for k, v in loss.items() if k not in SETTINGS}


def describe(loss: Mapping[str, Any] | str) -> str:
    """`dkd (alpha_t=1 beta_n=8 warmup_epochs=20)`: the loss and its settings, for the console
    and reports. Runs made before `loss=` was a config group recorded its name alone."""
    if isinstance(loss, str):
        return loss
    settings = hyperparameters(loss)
    if loss.get("standardize"):
        settings = {"standardize": True, **settings}
    shown = " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else f'{v:g}'}" for k, v in settings.items()
    )
    return f"{loss['name']} ({shown})" if shown else str(loss["name"])
