"""A replica's training batches as a pure function of (seed, replica, step).

`ReplicaFeed.batch(step)` is the batch of `BatchStream` over the replica's
`replica_indices` at that step (today's order, unchanged), augmented with a
generator seeded by (seed, replica, step). A data server and a replica that
loads its data itself (`InlineFeed`) therefore give the same batches, and a
stream can be taken up at any step (a resumed or replaced replica, a data
server that took over another's replicas).

`open_feed` is what a replica trains from: its own `InlineFeed` when the job
has no data servers, else a `DataClient` streaming from them. Both count the
seconds the replica spent waiting for (or making) its batches. Example::

    data, model = replica_data_and_model(ctx)     # data is None with data servers
    with open_feed(ctx, data, start=0, total=ctx.job["steps"]) as feed:
        xb, yb = feed.next()                      # the batch of step 0, then 1, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import time

import torch

from distbelief.data.augment import Augmenter, augment_generator
from distbelief.data.datasets import load_dataset
from distbelief.data.sampling import BatchStream, replica_indices
from distbelief.model.zoo import build_model

if TYPE_CHECKING:
    from distbelief.job import JobConfig


class ReplicaFeed:
    """Replica `replica`'s batches of the training data, step by step. Not thread-safe."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cfg: JobConfig, replica: int):
        self.x, self.y, self.replica = x, y, replica
        self.seed, self.batch_size = cfg.train.seed, cfg.data.batch_size
        self.indices = replica_indices(len(y), replica, cfg.cluster.replicas, cfg.train.seed)
        self.augmenter = Augmenter(cfg.augment, tuple(x.shape[1:]))
        self._stream = self._fresh()
        self._next = 0

    def _fresh(self) -> BatchStream:
        return BatchStream(self.x, self.y, self.indices, self.batch_size,
                           seed=self.seed * 1000 + self.replica)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) batch of `step`; fastest when steps are asked for in order."""
        if step != self._next:
            self._stream = self._fresh()
            self._stream.skip(step)
        xb, yb = self._stream.next()
        self._next = step + 1
        if self.augmenter.enabled:
            xb = self.augmenter(xb, augment_generator(self.seed, self.replica, step))
        return xb, yb


class InlineFeed:
    """A replica's own batches, from `start` on (no data servers)."""

    def __init__(self, feed: ReplicaFeed, start: int):
        self.feed, self.step = feed, start
        self.wait_seconds = 0.0  # spent making batches (reading and augmenting)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        began = time.perf_counter()
        batch = self.feed.batch(self.step)
        self.step += 1
        self.wait_seconds += time.perf_counter() - began
        return batch

    def stats(self) -> dict:
        return {"data_seconds": self.wait_seconds}

    def __enter__(self) -> InlineFeed:
        return self

    def __exit__(self, *exc) -> None:
        pass


def load_data_and_model(cfg) -> tuple:
    """The job's dataset and its initial model (`cfg`: a JobConfig), the same in every process.

    The model is built right after seeding torch with the job's seed, so the
    coordinator, every replica and every worker start from identical weights.
    """
    data = load_dataset(cfg.data.dataset, seed=cfg.train.seed, num_samples=cfg.data.num_samples)
    torch.manual_seed(cfg.train.seed)
    return data, build_model(cfg.model.name, data.input_shape, data.num_classes)


def replica_data_and_model(ctx) -> tuple:
    """(dataset, initial model) of a replica; the dataset is None with data servers, which
    read it instead: the model is built from the shapes in the job description."""
    cfg = ctx.config
    if not cfg.cluster.data_servers:
        return load_data_and_model(cfg)
    torch.manual_seed(cfg.train.seed)  # as load_data_and_model: every process the same weights
    return None, build_model(cfg.model.name, tuple(ctx.job["input_shape"]),
                             ctx.job["num_classes"])


def open_feed(ctx, data, start: int, total: int):
    """The batches replica `ctx.ident` trains on from step `start` to `total` - 1: a
    context manager with ``next()`` and ``stats()``. Connects to a data server (when
    the job has some) on entry."""
    cfg = ctx.config
    if data is not None:
        return InlineFeed(ReplicaFeed(data.x_train, data.y_train, cfg, ctx.ident), start)
    from distbelief.data.client import DataClient

    return DataClient(ctx.store, replica=ctx.ident, servers=cfg.cluster.data_servers,
                      start=start, total=total, input_shape=tuple(ctx.job["input_shape"]),
                      prefetch=cfg.data.prefetch, timeout=cfg.cluster.timeout)
