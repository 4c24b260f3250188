"""Models for tests, named as FILE.py:FACTORY (every role loads them by path)."""

from __future__ import annotations

import math

from torch import nn


def mlp_bn(input_shape, num_classes):
    """The digits MLP with a BatchNorm1d after each hidden layer: buffers to train and keep."""
    width = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, num_classes))
