"""The distillation objective of Hinton, Vinyals and Dean (2015), and logit matching.

`alpha` weights the soft term, as in the paper:
    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)
KL and the soft cross-entropy differ by the teacher's entropy, a constant, so their gradients
agree: d loss / d z_i = alpha * T * (q_T,i - p_T,i) + (1 - alpha) * (q_1,i - y_i).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


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


class Loss(NamedTuple):
    """A distillation loss `fn(student_logits, targets, labels, T, alpha)` and the temperature
    of the teacher targets it takes: the ensemble's log-probabilities at T, or at 1."""

    fn: Callable[..., torch.Tensor]
    targets_at_T: bool


# loss= -> the loss (the names are choices.LOSSES)
LOSSES: dict[str, Loss] = {
    "kd": Loss(distillation_loss, targets_at_T=True),
    "logit_mse": Loss(logit_matching_loss, targets_at_T=False),
}
