"""Evaluation of a model on a whole split (never "accuracy of the last batch")."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over every sample of (x, y)."""
    return evaluate_batches(model, ((x[start: start + batch_size], y[start: start + batch_size])
                                    for start in range(0, len(y), batch_size)))


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over every sample of the (x, y) `batches`
    (a split read a batch at a time: `distbelief.data.datasets.evaluate_split`)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, target in batches:
            logits = model(x)
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(dim=1) == target).sum().item()
            count += len(target)
    finally:
        model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)
