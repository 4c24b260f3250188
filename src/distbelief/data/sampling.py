"""The test split, each replica's slice of a dataset, and an endless stream of batches over it.

All are pure functions of their seed, so every process (and a replica that
restarts) computes the same split, partition and batch order, whatever holds
the data (tensors, a memory-mapped file, a torch Dataset: `distbelief.data.samples`)::

    part = replica_indices(len(y), replica=1, replicas=4, seed=0)
    stream = BatchStream(x, y, part, batch_size=32, seed=0)
    xb, yb = stream.next()
    stream = BatchStream(samples, None, part, batch_size=32, seed=0)   # any Samples
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from distbelief.data.samples import Samples, TensorSamples
from distbelief.errors import UserError

TEST_FRACTION = 0.2


def holdout_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) positions of ``range(n)``: 20% (at least one, at most n - 1) for
    test, chosen by a permutation seeded ``seed``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, int(n * TEST_FRACTION)), n - 1)
    return perm[n_test:], perm[:n_test]


def replica_indices(n: int, replica: int, replicas: int, seed: int) -> torch.Tensor:
    """Indices of replica ``replica``'s part of ``range(n)``.

    A seeded permutation of ``range(n)`` is cut into ``replicas`` contiguous
    parts whose sizes differ by at most one; the parts are disjoint and cover
    every index. Every process computes the same cut from the same seed.

    Raises:
        UserError: ``replicas`` < 1, more replicas than samples, or ``replica``
            outside ``0..replicas-1``.
    """
    if replicas < 1 or replicas > n:
        raise UserError(f"cannot split {n} samples among {replicas} replicas: use 1..{n} replicas")
    if not 0 <= replica < replicas:
        raise UserError(f"replica {replica} is out of range for {replicas} replicas: use 0..{replicas - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.tensor_split(perm, replicas)[replica].clone()


class BatchStream:
    """An endless stream of mini-batches over ``x[indices]``, ``y[indices]``.

    ``x`` is a tensor and ``y`` its labels, or ``x`` is any `Samples` and ``y``
    None: the batch order depends only on ``indices`` and ``seed``, and
    `next_indices` gives it without reading anything (`Samples.stream` reads it).

    Each epoch visits the indices in a fresh order drawn from a generator
    seeded by ``(seed, epoch)``, so a stream is reproducible from its seed and a
    restarted replica can rebuild it. The last partial batch of an epoch is
    dropped, unless the whole partition is smaller than one batch (then every
    batch is the whole partition, reshuffled). Not thread-safe.

    Attributes:
        epoch: the epoch the most recent batch came from (0 before any).
        steps_per_epoch: batches per epoch.
    """

    def __init__(self, x: torch.Tensor | Samples, y: torch.Tensor | None, indices: torch.Tensor,
                 batch_size: int, seed: int):
        """Raises UserError if ``batch_size`` < 1 or ``indices`` is empty."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}: use a positive batch size")
        if len(indices) == 0:
            raise UserError("this replica's data partition is empty: use fewer replicas or more samples")
        self.samples = x if y is None else TensorSamples(x, y)
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.batch_size = min(batch_size, len(self.indices))
        self.seed = seed
        self.steps_per_epoch = len(self.indices) // self.batch_size
        self.epoch = 0
        self._order = self._shuffled(0)
        self._step = 0

    def _shuffled(self, epoch: int) -> torch.Tensor:
        """The partition's indices in epoch ``epoch``'s order."""
        mixed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0])
        g = torch.Generator().manual_seed(mixed)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def skip(self, batches: int) -> None:
        """Move on as if `next` had been called `batches` times (a resumed replica)."""
        if batches <= 0:
            return
        self.epoch = (batches - 1) // self.steps_per_epoch
        self._order = self._shuffled(self.epoch)
        self._step = (batches - 1) % self.steps_per_epoch + 1

    def next_indices(self) -> torch.Tensor:
        """The positions of the next batch, starting a reshuffled epoch when one ends."""
        if self._step == self.steps_per_epoch:
            self.epoch += 1
            self._order = self._shuffled(self.epoch)
            self._step = 0
        start = self._step * self.batch_size
        batch = self._order[start : start + self.batch_size]
        self._step += 1
        return batch

    def index_batches(self) -> Iterator[torch.Tensor]:
        """`next_indices`, endlessly: what `Samples.stream` reads (and may read ahead)."""
        while True:
            yield self.next_indices()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the next ``(xb, yb)`` batch, starting a reshuffled epoch when one ends."""
        return self.samples.gather(self.next_indices())
