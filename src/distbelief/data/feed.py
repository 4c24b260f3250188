"""A replica's training batches as a pure function of (seed, replica, step).

`ReplicaFeed.batch(step)` is the batch of `BatchStream` over the replica's
`replica_indices` at that step (today's order, unchanged), augmented with a
generator seeded by (seed, replica, step). A data server and a replica that
loads its data itself (`InlineFeed`) therefore give the same batches, and a
stream can be taken up at any step (a resumed or replaced replica, a data
server that took over another's replicas). The batches are read from the
training split's `Samples` in order (`Samples.stream`): only the replica's own
rows, through a DataLoader for a torch Dataset (whose reader processes, if
any, `ReplicaFeed.close` stops).

`open_feed` is what a replica trains from: its own `InlineFeed` when the job
has no data servers, else a `DataClient` streaming from them. Both count the
seconds the replica spent waiting for (or making) its batches.

`describe_data` gives the job description's entries on the data (written by the
coordinator) and `known_shapes` reads them back, so that the other roles open a
directory or a torch Dataset without reading a sample, and a data server and its
replicas agree on the batches' shapes and dtypes. Example::

    data, model = replica_data_and_model(ctx)     # data is None with data servers
    with open_feed(ctx, data, start=0, total=ctx.job["steps"]) as feed:
        xb, yb = feed.next()                      # the batch of step 0, then 1, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import time

import torch

from distbelief.data.augment import Augmenter, augment_generator
from distbelief.data.datasets import Dataset, Known, load_dataset, split_validation
from distbelief.data.samples import Batches, Samples, TensorSamples
from distbelief.data.sampling import BatchStream, replica_indices
from distbelief.model.zoo import build_model
from distbelief.task import Targets, task_of

if TYPE_CHECKING:
    from distbelief.job import JobConfig


class ReplicaFeed:
    """Replica `replica`'s batches of the training data, step by step. Not thread-safe.

    ``x`` and ``y`` are the training tensors, or ``x`` is the training split's
    `Samples` and ``y`` None. Call `close` when done (it stops a DataLoader's
    reader processes; a no-op for data in memory).
    """

    def __init__(self, x: torch.Tensor | Samples, y: torch.Tensor | None, cfg: JobConfig,
                 replica: int):
        self.samples = x if y is None else TensorSamples(x, y)
        self.replica = replica
        self.seed, self.batch_size = cfg.train.seed, cfg.data.batch_size
        self.timeout = cfg.cluster.timeout
        self.indices = replica_indices(len(self.samples), replica, cfg.cluster.replicas,
                                       cfg.train.seed)
        self.augmenter = Augmenter(cfg.augment, self.samples.input_shape)
        self._fresh()  # a bad batch size or an empty partition: UserError now
        self._batches: Batches | None = None
        self._next = 0

    def _fresh(self) -> BatchStream:
        return BatchStream(self.samples, None, self.indices, self.batch_size,
                           seed=self.seed * 1000 + self.replica)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) batch of `step`; fastest when steps are asked for in order."""
        if self._batches is None or step != self._next:
            self.close()
            stream = self._fresh()
            stream.skip(step)
            self._batches = self.samples.stream(stream.index_batches(), timeout=self.timeout,
                                                seed=self.seed * 1000 + self.replica)
        xb, yb = next(self._batches)
        self._next = step + 1
        if self.augmenter.enabled:
            xb = self.augmenter(xb, augment_generator(self.seed, self.replica, step))
        return xb, yb

    def close(self) -> None:
        """End the current stream (its reader processes, if any). Idempotent."""
        batches, self._batches = self._batches, None
        if batches is not None:
            batches.close()


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
        self.feed.close()


def describe_data(data: Dataset) -> dict:
    """The job description's entries on ``data``: ``input_shape``, ``num_classes`` (the
    model's output width, `Dataset.num_classes`), ``target_shape`` and ``target_classes``
    (its `Targets`; None for regression). Plain JSON values; `known_shapes` reads them.

    Example: ``{"input_shape": [1, 8, 8], "num_classes": 10, "target_shape": [],
    "target_classes": 10}``.
    """
    return {"input_shape": [int(d) for d in data.input_shape],
            "num_classes": int(data.num_classes),
            "target_shape": [int(d) for d in data.targets.shape],
            "target_classes": data.targets.classes}


def known_shapes(job: dict | None) -> Known | None:
    """(input shape, `Targets`) from a job description (`describe_data`'s entries), or None
    without them. A description without ``target_shape`` is of class ids:
    ``Targets((), num_classes)``."""
    if not job or "input_shape" not in job or "num_classes" not in job:
        return None
    if "target_shape" not in job:
        targets = Targets((), int(job["num_classes"]))
    else:
        classes = job.get("target_classes")
        targets = Targets(tuple(int(d) for d in job["target_shape"]),
                          None if classes is None else int(classes))
    return tuple(int(d) for d in job["input_shape"]), targets


def load_job_data(cfg, job: dict | None = None):
    """The job's `Dataset` (`cfg`: a JobConfig), its validation split held out when
    --val-fraction asks for one: the same splits in every process. `job`: as in
    `load_data_and_model`."""
    data = load_dataset(cfg.data.dataset, seed=cfg.train.seed, num_samples=cfg.data.num_samples,
                        seq_len=cfg.data.seq_len, known=known_shapes(job), task=task_of(cfg))
    return split_validation(data, cfg.data.val_fraction, cfg.train.seed)


def load_data_and_model(cfg, job: dict | None = None) -> tuple:
    """The job's dataset and its initial model (`cfg`: a JobConfig), the same in every process.

    The model is built right after seeding torch with the job's seed, so the
    coordinator, every replica and every worker start from identical weights.
    `job`: the job description, whose shapes spare a role re-reading samples or targets
    to find them (a directory or a torch Dataset). The targets are read by the job's
    task (`distbelief.task.task_of`); the model's output width is `Dataset.num_classes`.
    """
    data = load_job_data(cfg, job)
    torch.manual_seed(cfg.train.seed)
    return data, build_model(cfg.model.name, data.input_shape, data.num_classes)


def replica_data_and_model(ctx) -> tuple:
    """(dataset, initial model) of a replica; the dataset is None with data servers, which
    read it instead: the model is built from the shapes in the job description."""
    cfg = ctx.config
    if not cfg.cluster.data_servers:
        return load_data_and_model(cfg, ctx.job)
    torch.manual_seed(cfg.train.seed)  # as load_data_and_model: every process the same weights
    return None, build_model(cfg.model.name, tuple(ctx.job["input_shape"]),
                             ctx.job["num_classes"])


def open_feed(ctx, data, start: int, total: int):
    """The batches replica `ctx.ident` trains on from step `start` to `total` - 1: a
    context manager with ``next()`` and ``stats()``. Connects to a data server (when
    the job has some) on entry."""
    cfg = ctx.config
    if data is not None:
        return InlineFeed(ReplicaFeed(data.train, None, cfg, ctx.ident), start)
    from distbelief.data.client import DataClient

    input_shape, targets = known_shapes(ctx.job)
    return DataClient(ctx.store, replica=ctx.ident, servers=cfg.cluster.data_servers,
                      start=start, total=total, input_shape=input_shape,
                      target_shape=targets.shape, target_dtype=task_of(cfg).target_dtype,
                      prefetch=cfg.data.prefetch, timeout=cfg.cluster.timeout,
                      waiting=ctx.waiting)
