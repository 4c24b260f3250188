"""Evaluation of a model on a whole split (never "accuracy of the last batch")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over every sample of (x, y)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start: start + batch_size])
        target = y[start: start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
    model.train(was_training)
    return loss_sum / max(len(y), 1), correct / max(len(y), 1)
