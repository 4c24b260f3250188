"""Evaluation of a model on a whole split (never "accuracy of the last batch").

The metrics are the job's task's (`distbelief.task`): for ``classify``
``{"loss", "accuracy"}``, for ``regress`` ``{"loss", "rmse", "mae"}``, for
``sequence`` ``{"loss", "perplexity", "token_accuracy"}``, plus the user's own.
Example::

    evaluate(model, x_test, y_test, make_task("classify"))   # {"loss": 0.31, "accuracy": 0.91}
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from distbelief.task import Task, make_task


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | None = None,
             batch_size: int = 2048) -> dict[str, float]:
    """The task's metrics (default: classify's) of `model` over every sample of (x, y)."""
    return evaluate_batches(model, ((x[start: start + batch_size], y[start: start + batch_size])
                                    for start in range(0, len(y), batch_size)), task)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     task: Task | None = None) -> dict[str, float]:
    """The task's metrics (default: classify's) of `model` over every sample of the (x, y)
    `batches` (a split read a batch at a time: `distbelief.data.datasets.evaluate_split`),
    with the model in eval mode (BatchNorm's running statistics, no dropout)."""
    meter = (task or make_task()).meter()
    was_training = model.training
    model.eval()
    try:
        for x, target in batches:
            meter.update(model(x), target)
    finally:
        model.train(was_training)
    return meter.result()
