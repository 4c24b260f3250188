"""One step of a replica's own optimizer on its local copy (ADMM's and EASGD's replicas).

The loss is the job's task's (`distbelief.task`), the batch's mean. The replica's
model parameters are a `FlatModel` whose gradient buffer is `grad`;
`extra(grad)`, when given, adds to the gradient before the rule applies it (ADMM's
pull towards the consensus), after `clip` (--clip-grad-norm) scaled the loss's own. A NaN/inf loss or gradient skips the step (or stops
the job: the reporter raises under ``--on-nonfinite stop``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from distbelief.model.precision import autocast
from distbelief.ps.rules import all_finite, clip_grad_norm_
from distbelief.task import Task


def local_step(model, grad: torch.Tensor, rule, feed, slow, report, step: int,
               extra: Callable[[torch.Tensor], None] | None = None, *, task: Task,
               clip: float | None = None, precision: str = "fp32") -> None:
    xb, yb = feed.next()
    grad.zero_()
    with slow.compute():
        with autocast(precision):  # the local copy and the rule stay float32
            loss = task.loss(model(xb), yb)
        loss.backward()
    value = loss.item()
    finite = math.isfinite(value) and all_finite(grad)
    if finite:
        clip_grad_norm_(grad, clip)  # the loss's gradient, before the pull
        if extra is not None:
            extra(grad)
        rule.apply(grad)
    report.step(value if finite else math.nan, len(yb))
    report.maybe_log(step)
