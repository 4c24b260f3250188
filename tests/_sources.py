"""The same small dataset three ways, for dataset factories (`--dataset PATH:function`):
arrays, a map-style torch Dataset, and {"train", "test"} Datasets. `write_npy_dir` saves
it as a directory of .npy files. float64 inputs, so every source converts to float32.
`logged` also appends "<role><id> <index>" to $DISTBELIEF_TEST_READLOG for every sample
read, and reads through one DataLoader reader process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SAMPLES, SHAPE, CLASSES = 240, (1, 6, 6), 4


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((SAMPLES, *SHAPE))  # float64
    y = (x.reshape(SAMPLES, -1)[:, :CLASSES].argmax(axis=1)).astype(np.int64)
    return {"x": x, "y": y}


class ArrayDataset(torch.utils.data.Dataset):
    """Sample i of `arrays()`: (float64 numpy input, 0-d int64 tensor label)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int | None = CLASSES):
        self.x, self.y = x, y
        if num_classes is not None:
            self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], torch.tensor(self.y[i])


def dataset() -> ArrayDataset:
    return ArrayDataset(**arrays())


class LoggedDataset(ArrayDataset):
    num_workers = 1  # a reader process: its reads are logged under its replica's name

    def __getitem__(self, i: int):
        role = os.environ.get("DISTBELIEF_ROLE", "coordinator")
        role += os.environ.get("DISTBELIEF_ID", "")
        with open(os.environ["DISTBELIEF_TEST_READLOG"], "a") as f:
            f.write(f"{role} {int(i)}\n")
        return super().__getitem__(i)


def logged() -> LoggedDataset:
    return LoggedDataset(**arrays())


def dataset_without_classes() -> ArrayDataset:
    return ArrayDataset(**arrays(), num_classes=None)


def train_test() -> dict[str, ArrayDataset]:
    a = arrays()
    return {"train": ArrayDataset(a["x"][:200], a["y"][:200]),
            "test": ArrayDataset(a["x"][200:], a["y"][200:])}


def write_npy_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, value in arrays().items():
        np.save(path / f"{name}.npy", value)
    return path
