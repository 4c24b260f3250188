"""Small datasets with targets of each task, as arrays and as torch Datasets (factories for
``--dataset PATH:function``), for tests/test_dataset_targets.py. float64 inputs and
targets, so every source converts."""

from __future__ import annotations

import numpy as np
import torch

SAMPLES, FEATURES, OUTPUTS = 60, 4, 3  # regression: x (N, 4), y (N, 3)
LENGTH, VOCABULARY = 5, 7  # sequences: x and y (N, 5) token ids below 7


def regress_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((SAMPLES, FEATURES))
    return {"x": x, "y": x @ rng.standard_normal((FEATURES, OUTPUTS))}


def sequence_arrays() -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(12).integers(0, VOCABULARY, (SAMPLES, LENGTH + 1))
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}  # the next token at every position


class Pairs(torch.utils.data.Dataset):
    """Sample i of arrays ``x``, ``y``: (float64 numpy input, its target as a tensor)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int | None = None):
        self.x, self.y = x, y
        if num_classes is not None:
            self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], torch.from_numpy(np.asarray(self.y[i]))


def regress_dataset() -> Pairs:
    return Pairs(**regress_arrays())


def scalar_regress_dataset() -> Pairs:
    a = regress_arrays()
    return Pairs(a["x"], a["y"][:, 0])  # 0-d targets


def sequence_dataset() -> Pairs:
    return Pairs(**sequence_arrays())  # the vocabulary found by reading the samples


def sequence_declared() -> Pairs:
    return Pairs(**sequence_arrays(), num_classes=VOCABULARY + 3)
