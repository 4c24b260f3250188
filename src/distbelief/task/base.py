"""The task's base: `Targets` (the form of a dataset's targets), `Task` (the loss, the
targets' checks and the metrics every task shares) and `Meter` (metrics summed over a
split). The built-in tasks are in `distbelief.task.builtin`; see the package's docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from distbelief.errors import UserError
from distbelief.plugins import load_callable

BUILTIN_LOSSES = {"classify": ("cross_entropy",), "regress": ("mse", "l1"),
                  "sequence": ("cross_entropy",)}
"""Each task's built-in losses, its default first."""


@dataclass(frozen=True)
class Targets:
    """The form of a dataset's targets, as found from its data.

    ``shape``: one sample's target shape (``()`` for a class id, ``(T,)`` for a
    sequence, S for regression). ``classes``: the number of classes (classify) or
    of token values (sequence); None for regression.
    """

    shape: tuple[int, ...] = ()
    classes: int | None = None

    @property
    def outputs(self) -> int:
        """The width of a built-in model's last layer: classes, or the target's values."""
        if self.classes is not None:
            return self.classes
        return math.prod(self.shape)


class Task:
    """One job's loss, target form and metrics (see the module docstring).

    Thread-safe: it holds no state beyond its configuration; `meter` gives a
    fresh accumulator each call.
    """

    name = "task"
    headline = "loss"
    """The metric named in messages and plotted against time."""
    higher_is_better = False
    target_dtype = torch.float32

    def __init__(self, loss: str | None = None, metrics: str | None = None):
        builtin = BUILTIN_LOSSES[self.name]
        self.loss_name = loss or builtin[0]
        self._user_loss: Callable | None = None
        if self.loss_name not in builtin:
            if ":" not in self.loss_name:
                raise UserError(f"--loss {self.loss_name!r} is not a loss of --task {self.name}: "
                                f"use {' or '.join(builtin)}, or your own as MODULE:FUNCTION or "
                                "FILE.py:FUNCTION")
            self._user_loss = load_callable(self.loss_name, "loss")
        self.metrics_spec = metrics
        self._user_metrics = load_callable(metrics, "metrics") if metrics else None

    # ---- the form of the targets -------------------------------------------

    def check_target_layout(self, y: np.ndarray, key: str, source: str) -> None:
        """Shape and dtype of a target array (N, ...) without reading its values.

        Raises:
            UserError: naming the array, what it has and what the task needs.
        """
        raise NotImplementedError

    def check_targets(self, y: np.ndarray, key: str, source: str) -> np.ndarray:
        """Check a target array's values and return it in the task's dtype (int64 or
        float32). Raises UserError naming the problem and the fix."""
        raise NotImplementedError

    def targets_of(self, arrays: list[np.ndarray]) -> Targets:
        """The `Targets` of checked target arrays (train and test)."""
        raise NotImplementedError

    def target(self, value: Any, source: str) -> torch.Tensor:
        """One sample's target (``dataset[i][1]``) as a tensor of the task's dtype.

        Raises:
            UserError: a value the task cannot learn from.
        """
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        return torch.as_tensor(self.check_targets(array[None], "a sample's target", source)[0])

    # ---- the model's output ---------------------------------------------------

    def check_output(self, out: Any, batch: int, targets: Targets, target: torch.Tensor,
                     model: str) -> None:
        """The model's output for a batch of ``batch`` fits the task and ``targets``.

        ``target``: a batch of ``batch`` targets of the right form (zeros), on which a
        user's loss and metrics are tried once. Raises UserError naming the model's
        output, what the task needs and the fix.
        """
        if not isinstance(out, torch.Tensor):
            raise UserError(f"{_who(model)} returned a {type(out).__name__}: return one tensor "
                            f"({self._expected(batch, targets)}) for --task {self.name}")
        self._check_shape(out, batch, targets, model)
        if self._user_loss is not None:
            value = self._user_loss(out, target)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                raise UserError(f"--loss {self.loss_name}: returned "
                                f"{type(value).__name__ if shape is None else f'a tensor of shape {shape}'}"
                                ": return the batch's mean loss as a 0-d tensor")
        if self._user_metrics is not None:
            self._call_metrics(out, target)

    def _expected(self, batch: int, targets: Targets) -> str:
        raise NotImplementedError

    def _check_shape(self, out: torch.Tensor, batch: int, targets: Targets, model: str) -> None:
        raise NotImplementedError

    def predict(self, output: torch.Tensor, targets: Targets) -> torch.Tensor:
        """A model's predictions from its outputs: class ids for classify, token ids for
        sequence, the outputs in the targets' shape for regress."""
        return output.argmax(dim=-1)

    def shaped(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The output in the form the loss compares with ``target`` (a view)."""
        return output

    # ---- the loss ----------------------------------------------------------------

    def loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
             ) -> torch.Tensor:
        """The loss of a batch: ``mean`` or ``sum`` of the per-sample losses, or ``none``
        (the per-sample losses, shape (N,))."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction {reduction!r}: use mean, sum or none")
        if self._user_loss is None:
            return self._builtin_loss(self.shaped(output, target), target, reduction)
        if reduction == "none":  # a mean per call: one call per sample
            return torch.stack([self._user_loss(output[i:i + 1], target[i:i + 1])
                                for i in range(len(target))])
        value = self._user_loss(output, target)
        return value * len(target) if reduction == "sum" else value

    def _builtin_loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str
                      ) -> torch.Tensor:
        raise NotImplementedError

    # ---- metrics -----------------------------------------------------------------

    def fields(self, metrics: dict[str, float], prefix: str = "test_") -> dict[str, float]:
        """Metrics as the fields of an event or summary: ``{"test_loss": ..., "test_accuracy":
        ...}``."""
        return {prefix + key: value for key, value in metrics.items()}

    def describe(self, metrics: dict[str, float], split: str = "test") -> str:
        """The headline metric in words: ``"test accuracy 0.9512"``."""
        name = self.headline if self.headline in metrics else "loss"
        return f"{split} {name.replace('_', ' ')} {metrics[name]:.4f}"

    def meter(self) -> Meter:
        """A fresh accumulator of this task's metrics over a split."""
        return Meter(self)

    def _sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """The task's own sums over one batch (besides the loss and the sample count)."""
        return {}

    def _finish(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """The task's own metrics from the summed `_sums` over ``count`` samples."""
        return {}

    def _call_metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        values = self._user_metrics(output, target)  # type: ignore[misc]
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise UserError(f"--metrics {self.metrics_spec}: returned a "
                            f"{type(values).__name__}: return a dict {{name: batch mean}}")
        out = {}
        for name, value in values.items():
            try:
                out[name] = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise UserError(f"--metrics {self.metrics_spec}: {name!r} is a "
                                f"{type(value).__name__}: give each metric as one number "
                                "(the batch's mean)") from None
        return out


class Meter:
    """Sums of a task's metrics over the batches of a split; `result` gives the means."""

    def __init__(self, task: Task):
        self.task, self.count, self.loss_sum = task, 0, 0.0
        self.sums: dict[str, float] = {}
        self.user: dict[str, float] = {}

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        n = len(target)
        self.loss_sum += float(self.task.loss(output, target, reduction="sum"))
        for key, value in self.task._sums(self.task.shaped(output, target), target).items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        if self.task._user_metrics is not None:
            for key, value in self.task._call_metrics(output, target).items():
                self.user[key] = self.user.get(key, 0.0) + value * n
        self.count += n

    def result(self) -> dict[str, float]:
        """{"loss": mean per-sample loss, then the task's metrics, then the user's}."""
        count = max(self.count, 1)
        out = {"loss": self.loss_sum / count, **self.task._finish(self.sums, self.count)}
        for key, value in self.user.items():
            if key in out:
                raise UserError(f"--metrics {self.task.metrics_spec}: returns {key!r}, which "
                                f"--task {self.task.name} reports already: rename it")
            out[key] = value / count
        return out


def _who(model: str) -> str:
    return f"model {model}" if model else "model"


def _class_ids(y: np.ndarray, key: str, source: str, fix: str) -> np.ndarray:
    """``y`` as int64 when it holds non-negative integers (floats holding integers too).

    Raises:
        UserError: non-integer or negative values.
    """
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise UserError(f"{source}: {key!r} has dtype {y.dtype} with non-integer values: {fix}")
    if y.size and y.min() < 0:
        raise UserError(f"{source}: {key!r} has value {int(y.min())}: {fix}")
    return y.astype(np.int64)
