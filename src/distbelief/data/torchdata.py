"""A user's map-style ``torch.utils.data.Dataset`` as a train and a test split.

A dataset factory (``--dataset module:function``) may return a Dataset (its
``__len__`` and ``__getitem__(i) -> (x, y)``: x a tensor or array, y the
sample's target in the job's task's form: a class id (an int or a 0-d tensor)
for ``classify``, token ids (T,) for ``sequence``, float values of any shape
for ``regress``) or ``{"train": Dataset, "test": Dataset}``. A single Dataset
is split like arrays: the seeded 20% of `distbelief.data.sampling.holdout_split`,
by index. Nothing is read up front except, in the coordinator:

- the first sample (of each dataset), for the input shape and the target's
  shape (a regression target's S, a sequence's length T);
- for class or token ids, the number of classes (of token values), unless the
  dataset says it: a ``num_classes`` attribute (on the train dataset, else on
  the test one) is used as it is. Without one, the ids are read from a
  ``targets`` attribute (one target per sample, torchvision's convention) when
  there is one, and else by reading every sample, but only for datasets of at
  most `SCAN_SAMPLES` samples in all (the same rule in every process, so they
  agree); larger ones are refused with one line asking for ``num_classes``.

Regression targets are checked (finite, the first sample's shape) as each
batch is read.

Processes that know the shapes from the job description (replicas, data
servers) read nothing at all when opening: only their own batches, later
(`distbelief.data.samples.TorchSamples`). A ``num_workers`` attribute (an int
>= 0) fixes the number of DataLoader reader processes; without it they are
chosen from the time a sample takes (`TorchSamples.workers_for`). Example::

    class Squares(torch.utils.data.Dataset):
        num_classes = 2
        def __len__(self): return 100
        def __getitem__(self, i): return torch.full((3,), float(i)), i % 2

    train, test, shape, targets = open_torch_dataset(Squares(), "factory 'm:f'", seed=0,
                                                     num_samples=None)
    targets             # Targets(shape=(), classes=2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from distbelief.data.samples import TorchSamples, sample_pair
from distbelief.data.sampling import holdout_split
from distbelief.errors import UserError
from distbelief.task import Targets, Task, make_task

__all__ = ["is_map_dataset", "open_torch_dataset", "SCAN_SAMPLES"]

SCAN_SAMPLES = 10_000  # the largest dataset whose class ids are found by reading every sample


def is_map_dataset(value: Any) -> bool:
    """A map-style dataset: a torch Dataset, or any object with ``__len__`` and
    ``__getitem__`` that is not a plain container or array."""
    if isinstance(value, torch.utils.data.IterableDataset):
        return False
    if isinstance(value, torch.utils.data.Dataset):
        return True
    plain = (Mapping, list, tuple, str, bytes, np.ndarray, torch.Tensor)
    return (hasattr(value, "__len__") and hasattr(value, "__getitem__")
            and not isinstance(value, plain))


def is_split_dict(value: Any) -> bool:
    """``{"train": ..., "test": ...}`` (as opposed to a dict of arrays ``x``, ``y``)."""
    return isinstance(value, Mapping) and ("train" in value or "test" in value) and "x" not in value


def open_torch_dataset(made: Any, source: str, *, seed: int, num_samples: int | None,
                       known: tuple[tuple[int, ...], Targets] | None = None,
                       task: Task | None = None
                       ) -> tuple[TorchSamples, TorchSamples, tuple[int, ...], Targets]:
    """(train, test, input shape, `Targets`) of a factory's Dataset or
    ``{"train": Dataset, "test": Dataset}``, its targets read by ``task`` (default
    classify).

    ``num_samples`` caps the training samples; ``known`` = (input shape,
    targets) from the job description means nothing is read here.

    Raises:
        UserError: not map-style datasets, too few samples, a bad first sample,
            a bad ``num_classes`` or ``num_workers`` attribute, bad class or token
            ids, or a number of classes that cannot be known cheaply.
    """
    task = task or make_task()
    if isinstance(made, Mapping):
        if set(made) != {"train", "test"}:
            raise UserError(f"{source} returned a dict with keys {sorted(map(str, made))}: return "
                            "{'train': Dataset, 'test': Dataset}, a single Dataset, or arrays "
                            "{'x': ..., 'y': ...}")
        train_set, test_set = made["train"], made["test"]
        for name, value in (("train", train_set), ("test", test_set)):
            _check_map_style(value, f"{source}'s {name!r}")
        if len(train_set) < 2:
            raise UserError(f"{source}: the 'train' dataset has {len(train_set)} samples: "
                            "give at least 2")
        train_rows = np.arange(len(train_set)) if num_samples is not None else None
        test_rows = None
    else:
        _check_map_style(made, source)
        train_set = test_set = made
        if len(made) < 2:
            raise UserError(f"{source}: the dataset has {len(made)} samples: give at least 2")
        train_rows, test_rows = holdout_split(len(made), seed)
    if num_samples is not None:
        train_rows = train_rows[:num_samples]
    workers = _workers(train_set, source)
    if known is not None:
        input_shape, targets = tuple(known[0]), known[1]
    else:
        input_shape, target_shape = _first_shapes(train_set, source, task)
        if test_set is not train_set and len(test_set):
            test_shapes = _first_shapes(test_set, source, task)
            if test_shapes[0] != input_shape:
                raise UserError(f"{source}: test samples have shape {test_shapes[0]} but train "
                                f"samples {input_shape}: make them match")
            if test_shapes[1] != target_shape:
                raise UserError(f"{source}: test samples' targets have shape {test_shapes[1]} but "
                                f"train samples' {target_shape}: make them match")
        classes = None
        if task.target_dtype == torch.int64:  # class or token ids: count them
            classes = _num_classes(train_set, test_set, train_rows, test_rows, source, task,
                                   target_shape)
        targets = Targets(target_shape, classes)

    def split(dataset: Any, rows: np.ndarray | None) -> TorchSamples:
        return TorchSamples(dataset, rows, input_shape=input_shape, targets=targets, task=task,
                            source=source, workers=workers)

    return split(train_set, train_rows), split(test_set, test_rows), input_shape, targets


def _check_map_style(value: Any, what: str) -> None:
    if isinstance(value, torch.utils.data.IterableDataset):
        raise UserError(f"{what} is an IterableDataset: give a map-style Dataset (with __len__ "
                        "and __getitem__), so that each replica can read its own samples")
    if not is_map_dataset(value):
        raise UserError(f"{what} is a {type(value).__name__}, not a Dataset: give a map-style "
                        "torch.utils.data.Dataset (with __len__ and __getitem__)")


def _workers(dataset: Any, source: str) -> int | None:
    workers = getattr(dataset, "num_workers", None)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 0):
        raise UserError(f"{source}: the dataset's num_workers is {workers!r}: give an int >= 0 "
                        "(0 reads in the training process) or leave it out")
    return workers


def _first_shapes(dataset: Any, source: str, task: Task
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, target shape) of ``dataset[0]``."""
    x, y = sample_pair(dataset[0], source, task)
    return tuple(int(d) for d in x.shape), tuple(int(d) for d in y.shape)


def _num_classes(train_set: Any, test_set: Any, train_rows: np.ndarray | None,
                 test_rows: np.ndarray | None, source: str, task: Task,
                 shape: tuple[int, ...]) -> int:
    """``num_classes`` of the dataset, else 1 + the largest class or token id of the samples
    used (each target of ``shape``)."""
    for dataset in (train_set, test_set):
        declared = getattr(dataset, "num_classes", None)
        if declared is not None:
            if (isinstance(declared, bool) or not isinstance(declared, (int, np.integer))
                    or declared < 1):
                raise UserError(f"{source}: the dataset's num_classes is {declared!r}: give a "
                                "positive int")
            return int(declared)
    parts = ((train_set, train_rows), (test_set, test_rows))
    if all(_targets(d, shape) is not None for d, _ in parts):
        ids = [_targets(d, shape)[rows] if rows is not None else _targets(d, shape)
               for d, rows in parts]
        return 1 + max((int(np.max(y)) if y.size else -1) for y in
                       (task.check_targets(y, "targets", source) for y in ids))
    total = sum(len(rows) if rows is not None else len(d) for d, rows in parts)
    if total > SCAN_SAMPLES:
        raise UserError(f"{source}: the number of classes is unknown and finding it would read "
                        f"all {total} samples: set a num_classes attribute on the dataset "
                        "(e.g. self.num_classes = 10)")
    top = -1
    for dataset, rows in parts:
        for i in (rows if rows is not None else range(len(dataset))):
            y = sample_pair(dataset[int(i)], source, task)[1]
            if tuple(y.shape) != shape:
                raise UserError(f"{source}: a sample's target has shape {tuple(y.shape)} but the "
                                f"first has {shape}: give every sample a target of the same shape")
            if y.numel():
                top = max(top, int(y.max()))
    return top + 1


def _targets(dataset: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The dataset's ``targets`` as an array (N, *shape) when it has one target per sample."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        array = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets)
    except (TypeError, ValueError):
        return None
    fits = array.ndim == 1 + len(shape) and tuple(array.shape[1:]) == shape
    return array if fits and len(array) == len(dataset) else None
