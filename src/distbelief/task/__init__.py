"""What a job learns: the loss, the form of the targets and the metrics, in one object.

Every place that computes a loss or a metric asks the job's `Task`: replicas,
pipeline stages, the units split, ADMM's dual layers, Sandblaster's portions,
evaluation and the planner's profile. Built in:

- ``classify`` (the default): targets are class ids, shape (N,); the model
  outputs logits (N, C); cross-entropy; metrics loss and accuracy.
- ``regress``: float targets of any trailing shape (N, *S); the model outputs
  (N, *S) (or (N, prod(S)), or (N, 1) for scalar targets); mean squared error
  (``--loss mse``, the default) or mean absolute error (``--loss l1``); metrics
  loss, rmse and mae over every target value.
- ``sequence``: targets are token ids (N, T); the model outputs logits
  (N, T, V); per-token cross-entropy; metrics loss (per token), perplexity and
  token accuracy.

A user's own loss is ``--loss MODULE:FUNCTION`` (or ``FILE.py:FUNCTION``):
``loss(output, target)`` returns the mean loss of the batch as a 0-d tensor.
A user's own metrics are ``--metrics MODULE:FUNCTION``: ``metrics(output,
target)`` returns ``{name: value}``, each the mean over the batch's samples;
evaluation weights them by batch size, so they are exact means over a split.

Each sample's loss is the mean over its own values (a sequence's tokens, a
regression target's elements), so ``reduction="sum"`` is the sum of those
per-sample losses and ``reduction="mean"`` their mean: a batch cut into
portions or micro-batches sums to the whole batch's loss. Example::

    task = make_task("regress", loss="l1")
    task.loss(model(x), y).backward()
    meter = task.meter()
    meter.update(model(x_test), y_test)
    meter.result()          # {"loss": ..., "rmse": ..., "mae": ...}

Metrics are exact sums kept here (correct counts, squared errors), not
torchmetrics: importing it costs about a second in every process that
evaluates, for sums of a few lines.
"""

from __future__ import annotations

from typing import Any

from distbelief.config import TASKS
from distbelief.errors import UserError
from distbelief.task.base import BUILTIN_LOSSES, Meter, Targets, Task
from distbelief.task.builtin import Classify, Regress, Sequence

__all__ = ["TASKS", "BUILTIN_LOSSES", "Targets", "Task", "Meter", "Classify", "Regress",
           "Sequence", "make_task", "task_of"]

_CLASSES: dict[str, type[Task]] = {"classify": Classify, "regress": Regress,
                                   "sequence": Sequence}


def make_task(name: str = "classify", *, loss: str | None = None,
              metrics: str | None = None) -> Task:
    """The task named ``name`` with its loss (None: the task's default) and the user's
    metrics (None: the task's own only).

    Raises:
        UserError: an unknown task, a loss the task does not have, or a user loss or
            metrics function that cannot be loaded.
    """
    if name not in TASKS:
        raise UserError(f"--task {name!r} is not a task: use {', '.join(TASKS)}")
    return _CLASSES[name](loss=loss, metrics=metrics)


def task_of(cfg: Any) -> Task:
    """The task of a job config (its ``[task]`` section)."""
    section = cfg.task
    return make_task(section.name, loss=section.loss, metrics=section.metrics)
