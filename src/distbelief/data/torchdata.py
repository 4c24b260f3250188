"""A user's map-style ``torch.utils.data.Dataset`` as a train and a test split.

A dataset factory (``--dataset module:function``) may return a Dataset (its
``__len__`` and ``__getitem__(i) -> (x, y)``: x a tensor or array, y an int or a
0-d tensor) or ``{"train": Dataset, "test": Dataset}``. A single Dataset is
split like arrays: the seeded 20% of `distbelief.data.sampling.holdout_split`,
by index. Nothing is read up front except, in the coordinator:

- the first sample, for the input shape;
- the labels, for the number of classes, unless the dataset says it: a
  ``num_classes`` attribute (on the train dataset, else on the test one) is
  used as it is. Without one, the labels are read from a ``targets`` attribute
  (a sequence with one label per sample, torchvision's convention) when there
  is one, and else by reading every sample, but only for datasets of at most
  `SCAN_SAMPLES` samples in all (the same rule in every process, so they agree);
  larger ones are refused with one line asking for ``num_classes``.

Processes that know the shapes from the job description (replicas, data
servers) read nothing at all when opening: only their own batches, later
(`distbelief.data.samples.TorchSamples`). A ``num_workers`` attribute (an int
>= 0) fixes the number of DataLoader reader processes; without it they are
chosen from the time a sample takes (`TorchSamples.workers_for`). Example::

    class Squares(torch.utils.data.Dataset):
        num_classes = 2
        def __len__(self): return 100
        def __getitem__(self, i): return torch.full((3,), float(i)), i % 2

    train, test, shape, classes = open_torch_dataset(Squares(), "factory 'm:f'", seed=0,
                                                     num_samples=None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from distbelief.data.checks import check_labels
from distbelief.data.samples import TorchSamples, sample_pair
from distbelief.data.sampling import holdout_split
from distbelief.errors import UserError

__all__ = ["is_map_dataset", "open_torch_dataset", "SCAN_SAMPLES"]

SCAN_SAMPLES = 10_000  # the largest dataset whose labels are found by reading every sample


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
                       known: tuple[tuple[int, ...], int] | None = None
                       ) -> tuple[TorchSamples, TorchSamples, tuple[int, ...], int]:
    """(train, test, input shape, number of classes) of a factory's Dataset or
    ``{"train": Dataset, "test": Dataset}``.

    ``num_samples`` caps the training samples; ``known`` = (input shape,
    classes) from the job description means nothing is read here.

    Raises:
        UserError: not map-style datasets, too few samples, a bad first sample,
            a bad ``num_classes`` or ``num_workers`` attribute, bad labels, or a
            number of classes that cannot be known cheaply.
    """
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
        input_shape, num_classes = tuple(known[0]), int(known[1])
    else:
        input_shape = _first_shape(train_set, source)
        if test_set is not train_set and len(test_set):
            test_shape = _first_shape(test_set, source)
            if test_shape != input_shape:
                raise UserError(f"{source}: test samples have shape {test_shape} but train samples "
                                f"{input_shape}: make them match")
        num_classes = _num_classes(train_set, test_set, train_rows, test_rows, source)

    def split(dataset: Any, rows: np.ndarray | None) -> TorchSamples:
        return TorchSamples(dataset, rows, input_shape=input_shape, num_classes=num_classes,
                            source=source, workers=workers)

    return split(train_set, train_rows), split(test_set, test_rows), input_shape, num_classes


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


def _first_shape(dataset: Any, source: str) -> tuple[int, ...]:
    x, _ = sample_pair(dataset[0], source)
    return tuple(int(d) for d in x.shape)


def _num_classes(train_set: Any, test_set: Any, train_rows: np.ndarray | None,
                 test_rows: np.ndarray | None, source: str) -> int:
    """``num_classes`` of the dataset, else 1 + the largest label of the samples used."""
    for dataset in (train_set, test_set):
        declared = getattr(dataset, "num_classes", None)
        if declared is not None:
            if (isinstance(declared, bool) or not isinstance(declared, (int, np.integer))
                    or declared < 1):
                raise UserError(f"{source}: the dataset's num_classes is {declared!r}: give a "
                                "positive int")
            return int(declared)
    parts = ((train_set, train_rows), (test_set, test_rows))
    if all(_targets(d) is not None for d, _ in parts):
        labels = [_targets(d)[rows] if rows is not None else _targets(d) for d, rows in parts]
        return 1 + max((int(np.max(y)) if len(y) else -1) for y in
                       (check_labels(y, "targets", source) for y in labels))
    total = sum(len(rows) if rows is not None else len(d) for d, rows in parts)
    if total > SCAN_SAMPLES:
        raise UserError(f"{source}: the number of classes is unknown and finding it would read "
                        f"all {total} samples: set a num_classes attribute on the dataset "
                        "(e.g. self.num_classes = 10)")
    top = -1
    for dataset, rows in parts:
        for i in (rows if rows is not None else range(len(dataset))):
            label = sample_pair(dataset[int(i)], source)[1]
            if label < 0:
                raise UserError(f"{source}: a sample has label {label}: labels must be class "
                                "ids 0..C-1")
            top = max(top, label)
    return top + 1


def _targets(dataset: Any) -> np.ndarray | None:
    """The dataset's ``targets`` as a 1-D array when it has one label per sample."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        array = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets)
    except (TypeError, ValueError):
        return None
    return array if array.ndim == 1 and len(array) == len(dataset) else None
