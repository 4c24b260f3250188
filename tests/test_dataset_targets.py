"""The data layer carries the targets of every task (`distbelief.task`): regression targets
(float32, any trailing shape) and token sequences (int64 (N, T)) from .npz files, .npy
directories and torch Datasets, checked by the task; the built-in class-label datasets
refused for other tasks; the job description's entries on the targets."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes

from distbelief.data.datasets import BUILTIN, evaluate_split, load_dataset
from distbelief.data.feed import describe_data, known_shapes
from distbelief.data.samples import ArraySamples, TorchSamples
from distbelief.errors import UserError
from distbelief.model.evaluate import evaluate
from distbelief.task import Targets, make_task

import _targets

TARGETS = str(Path(_targets.__file__).resolve())
REGRESS, SEQUENCE = make_task("regress"), make_task("sequence")


def npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def npy_dir(path: Path, **arrays) -> str:
    path.mkdir()
    for name, value in arrays.items():
        np.save(path / f"{name}.npy", value)
    return str(path)


def refused(spec: str, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_dataset(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_diabetes_loads_for_regression(tmp_path):
    diabetes = load_diabetes()
    spec = npz(tmp_path / "diabetes.npz", x=diabetes.data, y=diabetes.target)
    data = load_dataset(spec, seed=0, task=REGRESS)
    assert data.targets == Targets((), None) and data.targets.classes is None
    assert data.num_classes == 1  # the model's output width
    assert data.y_train.dtype == torch.float32 and data.y_train.shape == (len(data.train),)
    assert len(data.train) + len(data.test) == 442 and data.input_shape == (10,)
    both = torch.cat([data.y_train, data.y_test]).sort().values
    assert torch.equal(both, torch.from_numpy(diabetes.target.astype(np.float32)).sort().values)
    assert describe_data(data) == {"input_shape": [10], "num_classes": 1, "target_shape": [],
                                   "target_classes": None}


def test_standardised_diabetes_targets_are_refused_by_classify(tmp_path):
    diabetes = load_diabetes()
    y = (diabetes.target - diabetes.target.mean()) / diabetes.target.std()
    message = refused(npz(tmp_path / "d.npz", x=diabetes.data, y=y))  # classify, the default
    assert "'y' has dtype float64 with non-integer values" in message
    assert "class ids" in message and "--task regress" in message
    # diabetes' own targets are whole numbers (25..346): class ids to classify, as any
    # integer-valued float labels are; the task decides
    raw = load_dataset(npz(tmp_path / "raw.npz", x=diabetes.data, y=diabetes.target))
    assert raw.targets == Targets((), 347) and raw.y_train.dtype == torch.int64


def test_regression_targets_keep_their_trailing_shape(tmp_path):
    arrays = _targets.regress_arrays()
    data = load_dataset(npz(tmp_path / "r.npz", **arrays), seed=1, task=REGRESS)
    assert data.targets == Targets((3,), None) and data.num_classes == 3
    assert data.y_train.shape == (48, 3) and data.y_test.shape == (12, 3)
    assert data.y_train.dtype == torch.float32
    cube = {"x": arrays["x"], "y": arrays["y"].reshape(60, 3, 1).repeat(2, axis=2)}
    assert load_dataset(npz(tmp_path / "c.npz", **cube), task=REGRESS).targets == \
        Targets((3, 2), None)
    mismatched = {**arrays, "x_test": arrays["x"][:4], "y_test": arrays["y"][:4, :2]}
    message = refused(npz(tmp_path / "m.npz", **mismatched), task=REGRESS)
    assert "y_test samples have shape (2,) but y samples (3,): make them match" in message


def test_sequence_targets_are_token_ids_of_a_fixed_length(tmp_path):
    arrays = _targets.sequence_arrays()
    data = load_dataset(npz(tmp_path / "s.npz", **arrays), task=SEQUENCE)
    assert data.targets == Targets((5,), 7) and data.num_classes == 7
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (48, 5)
    assert data.y_train.dtype == torch.int64 and data.y_train.shape == (48, 5)
    message = refused(npz(tmp_path / "flat.npz", x=arrays["x"], y=arrays["y"][:, 0]),
                      task=SEQUENCE)
    assert "'y' has shape (60,)" in message and "(N, T)" in message
    floats = {"x": arrays["x"], "y": arrays["y"] + 0.5}
    assert "non-integer" in refused(npz(tmp_path / "f.npz", **floats), task=SEQUENCE)


@pytest.mark.parametrize("key", ["y", "y_test"])
def test_non_finite_regression_targets_are_refused(tmp_path, key):
    arrays = _targets.regress_arrays()
    arrays = {**arrays, "x_test": arrays["x"][:5], "y_test": arrays["y"][:5].copy()}
    arrays[key] = arrays[key].copy()
    arrays[key][3, 1] = np.nan
    message = refused(npz(tmp_path / "nan.npz", **arrays), task=REGRESS)
    assert f"{key!r} has 1 non-finite targets" in message and "nan.npz" in message
    directory = npy_dir(tmp_path / "nan", **arrays)  # found by the chunked scan
    assert f"'{key}.npy' has 1 non-finite targets" in refused(directory, task=REGRESS)


def test_a_directory_and_a_torch_dataset_gather_the_arrays_targets(tmp_path):
    arrays = _targets.regress_arrays()  # y float64: each source converts it
    options = dict(seed=2, num_samples=40, task=REGRESS)
    memory = load_dataset(npz(tmp_path / "r.npz", **arrays), **options)
    directory = load_dataset(npy_dir(tmp_path / "r", **arrays), **options)
    factory = load_dataset(f"{TARGETS}:regress_dataset", **options)
    assert isinstance(directory.train, ArraySamples) and isinstance(factory.train, TorchSamples)
    for data in (directory, factory):
        assert data.targets == memory.targets == Targets((3,), None)
        for split, positions in (("train", [5, 0, 39, 5, 17]), ("test", [11, 0, 3])):
            got = getattr(data, split).gather(torch.tensor(positions))
            want = getattr(memory, split).gather(torch.tensor(positions))
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert torch.equal(data.y_test, memory.y_test)
    scalar = load_dataset(f"{TARGETS}:scalar_regress_dataset", **options)
    assert scalar.targets == Targets((), None)
    assert torch.equal(scalar.y_train, memory.y_train[:, 0])


def test_sequences_from_a_directory_and_a_torch_dataset(tmp_path):
    arrays = _targets.sequence_arrays()
    memory = load_dataset(npz(tmp_path / "s.npz", **arrays), seed=3, task=SEQUENCE)
    stored = {**arrays, "y": arrays["y"].astype(np.int16)}  # any integer dtype on disk
    directory = load_dataset(npy_dir(tmp_path / "s", **stored), seed=3, task=SEQUENCE)
    scanned = load_dataset(f"{TARGETS}:sequence_dataset", seed=3, task=SEQUENCE)
    declared = load_dataset(f"{TARGETS}:sequence_declared", seed=3, task=SEQUENCE)
    assert memory.targets == directory.targets == scanned.targets == Targets((5,), 7)
    assert declared.targets == Targets((5,), 10)  # its num_classes, as it says
    for data in (directory, scanned, declared):
        for got, want in ((data.x_train, memory.x_train), (data.y_train, memory.y_train),
                          (data.y_test, memory.y_test)):
            assert got.dtype == want.dtype and torch.equal(got, want)


class _Ragged(torch.utils.data.Dataset):
    """Targets of sample 0's shape, except sample 1's (another shape) and 2's (NaN)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        target = {1: np.zeros(4), 2: np.array([0.0, np.nan, 0.0])}.get(i, np.ones(3))
        return np.zeros(2), target


def test_a_torch_datasets_targets_are_checked_as_read():
    from distbelief.data.torchdata import open_torch_dataset

    train, _, _, targets = open_torch_dataset(_Ragged(), "factory 'm:f'", seed=0,
                                              num_samples=None, task=REGRESS)
    assert targets == Targets((3,), None)  # from the first sample, nothing else read
    for index, fragment in ((1, "a sample's target has shape (4,) but the dataset's targets "
                                "have shape (3,)"), (2, "1 non-finite targets")):
        with pytest.raises(UserError, match=re.escape(fragment)) as info:
            TorchSamples(_Ragged(), None, input_shape=(2,), targets=targets, task=REGRESS,
                         source="factory 'm:f'").gather(torch.tensor([0, index]))
        assert "\n" not in str(info.value)
    sequences = TorchSamples(_targets.sequence_dataset(), None, input_shape=(5,),
                             targets=Targets((5,), 6), task=SEQUENCE, source="factory 'm:f'")
    with pytest.raises(UserError, match="token id 6 is outside 0..5"):
        sequences.gather(torch.arange(60))


@pytest.mark.parametrize("task", ["regress", "sequence"])
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_datasets_are_class_labels_only(tmp_path, name, task):
    began = time.perf_counter()
    message = refused(name, task=make_task(task), cache_dir=tmp_path)
    assert message.startswith(f"dataset {name!r} has class labels: use --task classify")
    assert f"--task {task}" in message and "MODULE:FUNCTION" in message
    assert not list(tmp_path.iterdir()) and time.perf_counter() - began < 1  # nothing made


def test_the_job_description_carries_the_targets(tmp_path):
    regress = npy_dir(tmp_path / "r", **_targets.regress_arrays())
    sequence = npy_dir(tmp_path / "s", **_targets.sequence_arrays())
    labels = npz(tmp_path / "c.npz", x=np.zeros((6, 2)), y=np.arange(6) % 3)
    for spec, task in ((regress, REGRESS), (sequence, SEQUENCE), (labels, None)):
        data = load_dataset(spec, task=task)
        job = json.loads(json.dumps(describe_data(data)))  # as the store carries it
        assert known_shapes(job) == (data.input_shape, data.targets)
        assert job["num_classes"] == data.num_classes
    assert known_shapes({"input_shape": [4], "num_classes": 10}) == ((4,), Targets((), 10))
    assert known_shapes({"input_shape": [4]}) is None and known_shapes(None) is None
    # a role that knows the targets does not scan them (the coordinator did)
    np.save(tmp_path / "r" / "y.npy", np.full((60, 3), np.nan))
    data = load_dataset(regress, task=REGRESS, known=((4,), Targets((3,), None)))
    assert data.targets == Targets((3,), None)


def test_evaluate_split_reports_the_tasks_metrics(tmp_path):
    data = load_dataset(npz(tmp_path / "r.npz", **_targets.regress_arrays()), task=REGRESS)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    got = evaluate_split(model, data.test, batch_size=5, task=REGRESS)
    assert set(got) == {"loss", "rmse", "mae"}
    assert got == evaluate(model, data.x_test, data.y_test, REGRESS, batch_size=5)
