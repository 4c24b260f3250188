"""Shared pytest fixtures."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed torch and numpy (seed 0) before every test so results are reproducible."""
    torch.manual_seed(0)
    np.random.seed(0)
