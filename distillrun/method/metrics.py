"""How good a model's predictions are: accuracy, errors, NLL, calibration, agreement."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def expected_calibration_error(log_probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    conf, pred = log_probs.exp().max(dim=1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1, device=conf.device)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    ece = torch.zeros((), device=conf.device)
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.float().mean() * (conf[mask].mean() - correct[mask].mean()).abs()
    return float(ece)


def classification_metrics(
    log_probs: torch.Tensor, y: torch.Tensor, prefix: str = "test"
) -> dict[str, Any]:
    """Accuracy, errors, NLL and ECE of predicted log-probabilities (or logits) against labels."""
    if len(y) == 0:
        return {}
    log_probs = F.log_softmax(log_probs.detach().float(), dim=1)
    errors = int((log_probs.argmax(dim=1) != y).sum())
    return {
        f"{prefix}_accuracy": 1 - errors / len(y),
        f"{prefix}_errors": errors,
        f"{prefix}_nll": float(F.nll_loss(log_probs, y)),
        f"{prefix}_ece": expected_calibration_error(log_probs, y),
    }


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of examples on which two models predict the same class."""
    return float((a.argmax(dim=1) == b.argmax(dim=1)).float().mean())
