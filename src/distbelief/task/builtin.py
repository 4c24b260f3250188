"""The built-in tasks: `Classify`, `Regress` and `Sequence` (see `distbelief.task`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from distbelief.errors import UserError
from distbelief.task.base import Targets, Task, _class_ids, _who

class Classify(Task):
    name = "classify"
    headline = "accuracy"
    higher_is_better = True
    target_dtype = torch.int64

    def check_target_layout(self, y: np.ndarray, key: str, source: str) -> None:
        if y.ndim != 1:
            raise UserError(f"{source}: {key!r} has shape {y.shape}: --task classify needs 1-D "
                            "integer class labels, not one-hot (for other targets use --task "
                            "regress or --task sequence)")
        if y.dtype.kind not in "iubf":
            raise UserError(f"{source}: {key!r} has dtype {y.dtype}: labels must be integer "
                            "class ids 0..C-1")

    def check_targets(self, y: np.ndarray, key: str, source: str) -> np.ndarray:
        self.check_target_layout(y, key, source)
        return _class_ids(y, key, source, "labels must be class ids 0..C-1 (float targets: "
                          "--task regress)")

    def targets_of(self, arrays: list[np.ndarray]) -> Targets:
        return Targets((), 1 + max((int(y.max()) for y in arrays if len(y)), default=0))

    def _expected(self, batch: int, targets: Targets) -> str:
        return f"logits of shape ({batch}, {targets.classes})"

    def _check_shape(self, out: torch.Tensor, batch: int, targets: Targets, model: str) -> None:
        if out.dim() != 2 or out.shape[0] != batch:
            raise UserError(f"{_who(model)} output has shape {tuple(out.shape)} for a batch of "
                            f"{batch}, but --task classify needs ({batch}, {targets.classes}): "
                            "end the model with a Linear layer giving one logit per class "
                            "(or choose --task regress or sequence)")
        if out.shape[1] != targets.classes:
            hint = (" (targets that are numbers to predict, not class ids: --task regress)"
                    if out.shape[1] == 1 else "")
            raise UserError(f"{_who(model)} output has width {out.shape[1]} but the dataset has "
                            f"{targets.classes} classes: make the last layer output "
                            f"{targets.classes} units{hint}")

    def _builtin_loss(self, output, target, reduction):
        return F.cross_entropy(output, target, reduction=reduction)

    def _sums(self, output, target):
        return {"correct": float((output.argmax(dim=1) == target).sum())}

    def _finish(self, sums, count):
        return {"accuracy": sums.get("correct", 0.0) / max(count, 1)}


class Regress(Task):
    name = "regress"
    headline = "rmse"
    higher_is_better = False
    target_dtype = torch.float32

    def check_target_layout(self, y: np.ndarray, key: str, source: str) -> None:
        if y.ndim < 1:
            raise UserError(f"{source}: {key!r} is a single number: give one target per sample")
        if y.dtype.kind not in "iubf":
            raise UserError(f"{source}: {key!r} has dtype {y.dtype}: --task regress needs "
                            "numeric targets")

    def check_targets(self, y: np.ndarray, key: str, source: str) -> np.ndarray:
        self.check_target_layout(y, key, source)
        values = y.astype(np.float32)
        if not np.all(np.isfinite(values)):
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise UserError(f"{source}: {key!r} has {bad} non-finite targets (NaN or inf): "
                            "clean or drop those samples")
        return values

    def targets_of(self, arrays: list[np.ndarray]) -> Targets:
        return Targets(tuple(int(d) for d in arrays[0].shape[1:]), None)

    def _expected(self, batch: int, targets: Targets) -> str:
        return f"shape {(batch, *targets.shape) if targets.shape else (batch, 1)}"

    def _check_shape(self, out: torch.Tensor, batch: int, targets: Targets, model: str) -> None:
        values = math.prod(targets.shape)
        if out.dim() < 1 or out.shape[0] != batch or out[0].numel() != values:
            want = (batch, *targets.shape) if targets.shape else (batch, 1)
            raise UserError(f"{_who(model)} output has shape {tuple(out.shape)} for a batch of "
                            f"{batch}, but the targets have shape {targets.shape or '()'} per "
                            f"sample: make the model output {want} ({values} values per sample)")

    def shaped(self, output, target):
        return output.reshape(target.shape)

    def predict(self, output, targets):
        return output.reshape(len(output), *targets.shape)

    def _builtin_loss(self, output, target, reduction):
        fn = F.mse_loss if self.loss_name == "mse" else F.l1_loss
        if reduction == "mean":
            return fn(output, target)
        per = fn(output, target, reduction="none")
        per = per.reshape(len(target), -1).mean(dim=1) if per.dim() > 1 else per
        return per if reduction == "none" else per.sum()

    def _sums(self, output, target):
        error = (output - target).double()
        return {"squared": float(error.square().sum()), "absolute": float(error.abs().sum()),
                "values": float(target.numel())}

    def _finish(self, sums, count):
        values = max(sums.get("values", 0.0), 1.0)
        return {"rmse": math.sqrt(sums.get("squared", 0.0) / values),
                "mae": sums.get("absolute", 0.0) / values}


class Sequence(Task):
    name = "sequence"
    headline = "perplexity"
    higher_is_better = False
    target_dtype = torch.int64

    def check_target_layout(self, y: np.ndarray, key: str, source: str) -> None:
        if y.ndim != 2:
            raise UserError(f"{source}: {key!r} has shape {y.shape}: --task sequence needs "
                            "token ids of shape (N, T)")
        if y.dtype.kind not in "iubf":
            raise UserError(f"{source}: {key!r} has dtype {y.dtype}: token ids must be "
                            "integers 0..V-1")

    def check_targets(self, y: np.ndarray, key: str, source: str) -> np.ndarray:
        self.check_target_layout(y, key, source)
        return _class_ids(y, key, source, "token ids must be integers 0..V-1")

    def targets_of(self, arrays: list[np.ndarray]) -> Targets:
        return Targets((int(arrays[0].shape[1]),),
                       1 + max((int(y.max()) for y in arrays if y.size), default=0))

    def _expected(self, batch: int, targets: Targets) -> str:
        return f"logits of shape ({batch}, {targets.shape[0]}, {targets.classes})"

    def _check_shape(self, out: torch.Tensor, batch: int, targets: Targets, model: str) -> None:
        want = (batch, targets.shape[0])
        if out.dim() != 3 or tuple(out.shape[:2]) != want:
            raise UserError(f"{_who(model)} output has shape {tuple(out.shape)} for a batch of "
                            f"{batch}, but --task sequence needs ({batch}, {targets.shape[0]}, "
                            f"{targets.classes}): logits for every position of the sequence")
        if out.shape[2] < targets.classes:  # type: ignore[operator]
            raise UserError(f"{_who(model)} gives {out.shape[2]} logits per position but the "
                            f"targets hold token ids up to {targets.classes - 1}: make the last "  # type: ignore[operator]
                            f"layer output at least {targets.classes} units")

    def _builtin_loss(self, output, target, reduction):
        flat = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1),
                               reduction="mean" if reduction == "mean" else "none")
        if reduction == "mean":
            return flat
        per = flat.reshape(target.shape).mean(dim=1)
        return per if reduction == "none" else per.sum()

    def _sums(self, output, target):
        return {"correct": float((output.argmax(dim=-1) == target).sum()),
                "tokens": float(target.numel()),
                "loss_tokens": float(self.loss(output, target, reduction="sum")
                                     * target.shape[1])}

    def _finish(self, sums, count):
        tokens = max(sums.get("tokens", 0.0), 1.0)
        return {"perplexity": math.exp(min(sums.get("loss_tokens", 0.0) / tokens, 700.0)),
                "token_accuracy": sums.get("correct", 0.0) / tokens}
