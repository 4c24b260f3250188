"""Tests for distbelief.data.npydir: a directory of .npy files, memory-mapped, as
`load_dataset` reads it; the same split, values and classes as the same arrays in
memory, and one clear line for each malformed directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distbelief.data.datasets import load_dataset
from distbelief.data.samples import ArraySamples
from distbelief.errors import UserError
from distbelief.task import Targets


def save(path, **arrays):
    path.mkdir(exist_ok=True)
    for name, value in arrays.items():
        np.save(path / f"{name}.npy", value)
    return str(path)


def test_same_split_values_and_classes_as_arrays_in_memory(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3, 2))  # float64, converted per batch
    y = np.arange(50) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    directory = load_dataset(save(tmp_path / "d", x=x, y=y), seed=2, num_samples=30)
    memory = load_dataset(str(tmp_path / "d.npz"), seed=2, num_samples=30)
    assert isinstance(directory.train, ArraySamples)
    assert isinstance(directory.train.x, np.memmap)  # opened, not loaded
    assert directory.input_shape == memory.input_shape
    assert directory.num_classes == memory.num_classes
    assert (len(directory.train), len(directory.test)) == (30, 10)
    for got, want in ((directory.x_train, memory.x_train), (directory.y_train, memory.y_train),
                      (directory.x_test, memory.x_test), (directory.y_test, memory.y_test)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_explicit_test_set_and_known_shapes(tmp_path):
    x, y = np.ones((20, 5), dtype=np.float32), np.arange(20) % 2
    spec = save(tmp_path / "d", x=x, y=y, x_test=x[:4], y_test=np.array([0, 1, 2, 1]))
    data = load_dataset(spec, num_samples=8)
    assert (len(data.train), len(data.test), data.num_classes) == (8, 4, 3)
    np.save(tmp_path / "d" / "y.npy", np.full(20, -1))  # a job's roles trust the coordinator
    assert load_dataset(spec, known=((5,), Targets((), 3))).num_classes == 3


def test_malformed_directories_are_refused_in_one_line(tmp_path):
    good = {"x": np.zeros((6, 2), dtype=np.float32), "y": np.arange(6) % 2}
    cases = [
        ({"y": good["y"]}, "no x.npy"),
        ({"x": good["x"]}, "no y.npy"),
        ({**good, "x_test": good["x"]}, "only one of x_test.npy and y_test.npy"),
        ({"x": good["x"], "y": np.arange(5)}, "6 samples but y.npy 5"),
        ({"x": good["x"].astype(np.complex64), "y": good["y"]}, "numeric inputs"),
        ({"x": np.zeros(6), "y": good["y"]}, "shape (N, features"),
        ({"x": good["x"], "y": np.array(list("abcdef"))}, "class ids"),
        ({"x": good["x"], "y": np.full(6, 0.5)}, "non-integer"),
        ({"x": good["x"], "y": -good["y"] - 1}, "'y.npy' has value -"),
        ({"x": good["x"], "y": np.zeros((6, 2))}, "not one-hot"),
        ({"x": good["x"][:1], "y": good["y"][:1]}, "at least 2"),
        ({**good, "x_test": np.zeros((2, 3)), "y_test": np.zeros(2, dtype=int)}, "make them match"),
        ({"x": np.array([object()] * 6, dtype=object).reshape(6, 1), "y": good["y"]},
         "Python objects"),
    ]
    for i, (arrays, fragment) in enumerate(cases):
        spec = str(tmp_path / f"case{i}")
        save(tmp_path / f"case{i}", **{k: v for k, v in arrays.items() if v.dtype != object})
        for name, value in arrays.items():
            if value.dtype == object:
                np.save(tmp_path / f"case{i}" / f"{name}.npy", value, allow_pickle=True)
        with pytest.raises(UserError, match=fragment.replace("(", r"\(")) as info:
            load_dataset(spec)
        assert "\n" not in str(info.value) and spec in str(info.value), fragment
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.npy").write_bytes(b"not an array at all" * 4)
    np.save(tmp_path / "junk" / "y.npy", np.arange(3))
    with pytest.raises(UserError, match="x.npy is not a .npy file") as info:
        load_dataset(str(tmp_path / "junk"))
    assert "pickle" not in str(info.value)  # numpy's own message would suggest unpickling
