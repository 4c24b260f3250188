"""Tests for distbelief.data.torchdata: a factory returning a torch Dataset (or train and
test Datasets), as `load_dataset` reads it: the split, the input shape, the number of
classes (declared, from `targets`, by a bounded scan, or refused), and nothing read by a
role that knows the shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distbelief.data.datasets import load_dataset
from distbelief.data.samples import TorchSamples
from distbelief.data.sampling import holdout_split
from distbelief.data.torchdata import SCAN_SAMPLES, open_torch_dataset
from distbelief.errors import UserError
from distbelief.task import Targets

import _sources

SOURCES = str(Path(_sources.__file__).resolve())


class Counting(torch.utils.data.Dataset):
    """n samples of shape (2,), label i % 3; counts its reads."""

    def __init__(self, n: int, **attributes):
        self.n, self.reads = n, 0
        self.__dict__.update(attributes)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return torch.full((2,), float(i)), i % 3


def open_(made, **kwargs):
    return open_torch_dataset(made, "dataset factory 'm:f'", seed=0,
                              num_samples=kwargs.pop("num_samples", None), **kwargs)


def test_a_dataset_splits_like_the_same_arrays():
    arrays = load_dataset(f"{SOURCES}:arrays", seed=4, num_samples=100)
    for factory in ("dataset", "dataset_without_classes"):
        data = load_dataset(f"{SOURCES}:{factory}", seed=4, num_samples=100)
        assert isinstance(data.train, TorchSamples)
        assert (data.input_shape, data.num_classes) == (arrays.input_shape, arrays.num_classes)
        assert (len(data.train), len(data.test)) == (100, len(arrays.test))
        assert torch.equal(data.x_train, arrays.x_train) and torch.equal(data.y_test, arrays.y_test)


def test_train_and_test_datasets():
    data = load_dataset(f"{SOURCES}:train_test", seed=4)
    assert (len(data.train), len(data.test), data.num_classes) == (200, 40, _sources.CLASSES)
    assert torch.equal(data.x_test, torch.from_numpy(_sources.arrays()["x"][200:]).float())


def test_classes_declared_from_targets_or_scanned_within_the_bound():
    declared = Counting(SCAN_SAMPLES * 2, num_classes=7)
    assert open_(declared)[3] == Targets((), 7) and declared.reads == 1  # the first: shapes
    targets = Counting(SCAN_SAMPLES * 2, targets=torch.arange(SCAN_SAMPLES * 2) % 5)
    assert open_(targets)[3] == Targets((), 5) and targets.reads == 1
    scanned = Counting(50)
    assert open_(scanned)[3] == Targets((), 3) and scanned.reads == 51
    train_rows, test_rows = holdout_split(50, 0)
    unused = int(train_rows[-1])  # not among the 3 training samples kept, nor a test sample
    capped = Counting(50, targets=[i % 3 if i != unused else 9 for i in range(50)])
    assert open_(capped, num_samples=3)[3].classes == 3  # like arrays: the samples used
    assert open_(capped)[3].classes == 10


def test_unknown_classes_of_a_large_dataset_are_refused_without_reading_it():
    big = Counting(SCAN_SAMPLES + 1)
    with pytest.raises(UserError, match="set a num_classes attribute") as info:
        open_(big)
    assert big.reads == 1 and "\n" not in str(info.value)


def test_a_role_that_knows_the_shapes_reads_nothing():
    dataset = Counting(SCAN_SAMPLES + 1)
    train, test, shape, targets = open_(dataset, known=((2,), Targets((), 3)))
    assert (shape, targets, dataset.reads) == ((2,), Targets((), 3), 0)
    assert len(train) + len(test) == SCAN_SAMPLES + 1


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])


@pytest.mark.parametrize("made, fragment", [
    (Stream(), "IterableDataset"),
    ({"train": Counting(5)}, "{'train': Dataset, 'test': Dataset}"),
    ({"train": Counting(5), "test": [1, 2]}, "'test' is a list"),
    (Counting(1), "at least 2"),
    (Counting(5, num_classes=0), "num_classes is 0"),
    (Counting(5, num_workers=-1), "num_workers is -1"),
    (Counting(5, targets=[0, 1, -2, 0, 1]), "'targets' has value -2"),
])
def test_bad_datasets_are_refused_in_one_line(made, fragment):
    with pytest.raises(UserError, match=fragment.replace("{", r"\{").replace("}", r"\}")) as info:
        open_(made)
    assert "\n" not in str(info.value)


def test_a_factory_returning_something_else_is_refused(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text("def make():\n    return 42\n")
    with pytest.raises(UserError, match="map-style torch.utils.data.Dataset"):
        load_dataset(f"{path}:make")
