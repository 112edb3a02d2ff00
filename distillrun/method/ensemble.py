"""Combining ensemble members' outputs into one distribution.

arithmetic: the mean of the members' probabilities, softmax(v_m / T) averaged over m.
geometric: the mean of the members' log-probabilities, renormalised; at temperature T this
           equals softmax(mean_m v_m / T), so it is the one combination that averages logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillrun.choices import ENSEMBLES, one_of


def combine(member_logits: torch.Tensor, method: str, T: float = 1.0) -> torch.Tensor:
    """The ensemble's log-probabilities [N, C] at temperature T, from its M members' raw
    logits [M, N, C] (`method`: "arithmetic" or "geometric", see above). The result is what
    `distillation_loss` takes as `teacher_log_probs` when T is the distillation temperature.
    An unknown method raises ValueError."""
    log_p = F.log_softmax(member_logits.float() / T, dim=-1)
    if method == "arithmetic":
        return torch.logsumexp(log_p, dim=0) - math.log(member_logits.shape[0])
    if method == "geometric":
        return F.log_softmax(log_p.mean(dim=0), dim=-1)
    raise ValueError(f"unknown ensemble combination '{method}': use {one_of(ENSEMBLES)}")
