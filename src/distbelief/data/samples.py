"""One split of a dataset, read by position: in memory, from a memory-mapped file, or from
a `torch.utils.data.Dataset`.

A `Samples` is what the rest of the package reads training and test data
through. Positions are ``0 .. len - 1`` in the split's own order;
`Samples.gather` returns float32 inputs ``(n, *input_shape)`` and the targets
``(n, *target_shape)`` in the job's task's dtype (`distbelief.task`: int64
class ids ``(n,)`` or token ids ``(n, T)``, float32 regression targets) for the
positions asked, in that order, and reads nothing else. So a replica that
gathers only its own batches touches only its own part of the data, whatever
the data's size:

- `TensorSamples`: tensors already in memory (the built-in data, .npz files,
  factories returning arrays); gathering is ``index_select``.
- `ArraySamples`: numpy arrays, typically ``np.load(..., mmap_mode="r")``
  memory maps of files larger than memory; each batch's rows are copied out
  of the map (and converted to float32 / the task's target dtype) when gathered.
- `TorchSamples`: a user's map-style ``torch.utils.data.Dataset``; batches are
  read through a ``torch.utils.data.DataLoader`` whose batch sampler yields the
  dataset indices of the requested positions, with worker processes when a
  sample is measured slow to read (`TorchSamples.workers_for`).

`Samples.stream` reads a sequence of position batches in order and returns
`Batches`, an iterator that may hold reader processes: close it (or use it in
``with``). Batches are identical however they are read (with or without
workers), as long as the dataset's ``__getitem__`` is a function of its index.
Example::

    samples = TensorSamples(torch.randn(10, 3), torch.arange(10) % 2)
    xb, yb = samples.gather(torch.tensor([4, 1]))
    with samples.stream(torch.arange(10).split(4)) as batches:
        for xb, yb in batches:
            ...

Not thread-safe: one reader per object (`Batches` streams are independent of
each other, so a data server gives each connection its own).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from distbelief.errors import UserError
from distbelief.task import Targets, Task, make_task

__all__ = ["Samples", "Batches", "TensorSamples", "ArraySamples", "TorchSamples",
           "SLOW_SAMPLE_SECONDS"]

SLOW_SAMPLE_SECONDS = 1e-3  # a Dataset sample slower than this to read gets reader processes
MAX_WORKERS = 4
PREFETCH_PER_WORKER = 2


class Batches:
    """An iterator of ``(x, y)`` batches; `close` ends whatever reads them (idempotent)."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        self._batches = batches

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._batches)

    def close(self) -> None:
        pass

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Samples:
    """A split of a dataset: ``len``, the input shape, rows (inputs and targets) by position."""

    input_shape: tuple[int, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 ``(n, *input_shape)``, y ``(n, *target_shape)`` of the task's dtype) of
        ``positions`` (1-D int64), in that order. Reads those samples only."""
        raise NotImplementedError

    def stream(self, batches: Iterable[torch.Tensor], *, seed: int = 0,
               timeout: float = 120.0) -> Batches:
        """The batches of the position batches in ``batches``, read in order (lazily: a
        batch is read when asked for, or ahead of time by reader processes). ``seed``
        seeds those processes' random generators; ``timeout`` bounds the wait for one
        batch from them."""
        return Batches(self.gather(p) for p in batches)

    def in_order(self, batch_size: int, **kwargs: Any) -> Batches:
        """Every sample, position 0 first, in batches of ``batch_size`` (the last may be
        smaller): for evaluation."""
        return self.stream(torch.arange(len(self)).split(batch_size), **kwargs)

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``min(n, len)`` samples."""
        return self.gather(torch.arange(min(n, len(self))))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample as two tensors. For data held out of memory this reads all of it
        (once; the result is kept): the training and evaluation paths never call it."""
        whole = getattr(self, "_whole", None)
        if whole is None:
            whole = self._whole = self.gather(torch.arange(len(self)))
        return whole


class SubsetSamples(Samples):
    """Positions ``rows`` (1-D int64) of another split ``base``, in that order: how a
    validation split is held out of a training split, whatever holds the data (reads go to
    ``base``: a torch Dataset keeps its reader processes)."""

    def __init__(self, base: Samples, rows: torch.Tensor):
        self.base, self.rows = base, rows
        self.input_shape = base.input_shape

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.gather(self.rows.index_select(0, positions))

    def stream(self, batches: Iterable[torch.Tensor], *, seed: int = 0,
               timeout: float = 120.0) -> Batches:
        return self.base.stream((self.rows.index_select(0, p) for p in batches), seed=seed,
                                timeout=timeout)


class TensorSamples(Samples):
    """Samples already in memory: ``x`` float32 ``(N, ...)``, ``y`` ``(N, *target_shape)`` in
    the task's dtype (checked and converted by the loader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.input_shape = tuple(int(d) for d in x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.index_select(0, positions), self.y.index_select(0, positions)

    def in_order(self, batch_size: int, **kwargs: Any) -> Batches:
        n = len(self)  # views, no copies
        return Batches((self.x[s: s + batch_size], self.y[s: s + batch_size])
                       for s in range(0, n, batch_size))

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:n], self.y[:n]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class ArraySamples(Samples):
    """Rows ``rows`` (all when None) of numpy arrays ``x`` ``(N, ...)`` and ``y``
    ``(N, *target_shape)``.

    Made for memory maps: `gather` copies only the asked-for rows out of ``x``
    and ``y`` and converts them to float32 and ``target_dtype`` (the same values
    as converting the whole arrays first). ``y`` may be stored in any numeric
    dtype; its values must suit the task (checked by the loader: integer-valued
    class or token ids for int64).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None,
                 target_dtype: torch.dtype = torch.int64):
        self.x, self.y, self.rows = x, y, rows
        self.input_shape = tuple(int(d) for d in x.shape[1:])
        self.target_dtype = target_dtype
        self._y_dtype = torch.empty(0, dtype=target_dtype).numpy().dtype

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.y)

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = positions.numpy()
        if self.rows is not None:
            index = self.rows[index]
        x = np.ascontiguousarray(self.x[index], dtype=np.float32)
        y = np.ascontiguousarray(self.y[index], dtype=self._y_dtype)
        return torch.from_numpy(x), torch.from_numpy(y)


class TorchSamples(Samples):
    """Indices ``rows`` (all when None) of a map-style ``torch.utils.data.Dataset`` whose
    ``dataset[i]`` is ``(x, y)``: x a tensor or array of ``input_shape`` (any numeric
    dtype, converted to float32), y the sample's target in the form ``targets`` says
    (`distbelief.task.Targets`), converted by ``task`` (default classify): a class id
    (an int or a 0-d tensor) in ``0 .. classes - 1``, token ids of shape (T,) below
    ``classes``, or float values of ``targets.shape``.

    Reader processes: ``workers`` when given (the dataset's ``num_workers``
    attribute), else `workers_for` the time the first batch of a stream took.
    """

    def __init__(self, dataset: Any, rows: np.ndarray | None, *, input_shape: tuple[int, ...],
                 targets: Targets, source: str, task: Task | None = None,
                 workers: int | None = None):
        self.dataset, self.rows, self.workers = dataset, rows, workers
        self.input_shape, self.targets = tuple(input_shape), targets
        self.collate = Collate(self.input_shape, targets, task or make_task(), source)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

    def indices(self, positions: torch.Tensor) -> list[int]:
        """The dataset's own indices (plain ints) of split positions."""
        index = positions.numpy()
        if self.rows is not None:
            index = self.rows[index]
        return [int(i) for i in index]

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate([self.dataset[i] for i in self.indices(positions)])

    def stream(self, batches: Iterable[torch.Tensor], *, seed: int = 0,
               timeout: float = 120.0) -> Batches:
        return _LoaderBatches(self, iter(batches), seed, timeout)

    def workers_for(self, seconds_per_sample: float) -> int:
        """Reader processes for a stream whose first batch took ``seconds_per_sample``
        per sample: the dataset's own ``num_workers`` when set; else none for fast
        samples (in-process reading costs nothing and forks nothing), and
        min(4, half the CPUs, at least 1) for samples slower than 1 ms each, whose
        reading would otherwise stall the training step."""
        if self.workers is not None:
            return self.workers
        if seconds_per_sample < SLOW_SAMPLE_SECONDS:
            return 0
        return min(MAX_WORKERS, max(1, (os.cpu_count() or 2) // 2))


class _LoaderBatches(Batches):
    """A `TorchSamples` stream: the first batch read in this process (and timed), the rest
    through a DataLoader, with the worker count that timing chose."""

    def __init__(self, samples: TorchSamples, positions: Iterator[torch.Tensor], seed: int,
                 timeout: float):
        self.samples, self.positions, self.seed, self.timeout = samples, positions, seed, timeout
        self.workers: int | None = None  # decided by the first batch
        self._iterator: Iterator | None = None
        self._closed = False

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise StopIteration
        if self._iterator is not None:
            return next(self._iterator)
        first = next(self.positions)
        began = time.perf_counter()
        batch = self.samples.gather(first)
        self.workers = self.samples.workers_for((time.perf_counter() - began) / max(1, len(first)))
        loader = torch.utils.data.DataLoader(
            self.samples.dataset,
            batch_sampler=(self.samples.indices(p) for p in self.positions),
            collate_fn=self.samples.collate, num_workers=self.workers,
            # its own generator: the workers' seeds come from it, not from (and without
            # advancing) torch's global generator, which seeded the model
            generator=torch.Generator().manual_seed(self.seed),
            timeout=self.timeout if self.workers else 0,
            prefetch_factor=PREFETCH_PER_WORKER if self.workers else None)
        self._iterator = iter(loader)
        return batch

    def close(self) -> None:
        """Stop the reader processes (if any) now rather than when garbage-collected."""
        self._closed = True
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class Collate:
    """``[(x, y), ...]`` from a Dataset -> (float32 ``(n, *input_shape)``, targets
    ``(n, *targets.shape)`` in the task's dtype), checking each sample's input shape and
    target (its form; class or token ids below ``targets.classes``). A class (not a
    closure) so reader processes can be started by any method."""

    def __init__(self, input_shape: tuple[int, ...], targets: Targets, task: Task, source: str):
        self.input_shape, self.targets, self.source = input_shape, targets, source
        # the target's form depends on the kind of task alone: a plain one, so that a
        # user's loss or metrics need not be picklable for reader processes
        self.task = make_task(task.name)

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for item in items:
            x, y = sample_pair(item, self.source, self.task)
            if tuple(x.shape) != self.input_shape:
                raise UserError(f"{self.source}: a sample has shape {tuple(x.shape)} but the "
                                f"first has {self.input_shape}: give every sample the same shape")
            check_target(y, self.targets, self.task, self.source)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)


def check_target(y: torch.Tensor, targets: Targets, task: Task, source: str) -> None:
    """One converted sample target ``y`` has the dataset's target shape and, for class or
    token ids, values below ``targets.classes``.

    Raises:
        UserError: another shape, or an id the model has no output for.
    """
    if tuple(y.shape) != targets.shape:
        raise UserError(f"{source}: a sample's target has shape {tuple(y.shape)} but the "
                        f"dataset's targets have shape {targets.shape}: give every sample a "
                        "target of the same shape")
    if targets.classes is not None and y.numel() and int(y.max()) >= targets.classes:
        what = "label" if task.name == "classify" else "token id"
        raise UserError(f"{source}: {what} {int(y.max())} is outside 0..{targets.classes - 1} "
                        f"(num_classes = {targets.classes}): fix the {what} or num_classes")


def sample_pair(item: Any, source: str, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``dataset[i]`` as (float32 input tensor, target tensor in ``task``'s dtype: a 0-d
    class id, token ids (T,), or float values of any shape).

    Raises:
        UserError: not an (x, y) pair, x not numeric or 0-d, y not a target of the task
            (a class id that is not one integer, token ids that are not 1-D, NaN for
            regression, ...).
    """
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UserError(f"{source}: dataset[i] returned a {type(item).__name__}: return a pair "
                        "(x, y) of an input tensor or array and its target")
    x, y = item
    try:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x,
                            dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{source}: a sample's input is not numeric ({exc}): return x as a "
                        "tensor or numpy array of numbers") from exc
    if x.dim() == 0:
        raise UserError(f"{source}: a sample's input is a single number: give each sample "
                        "at least one dimension, e.g. shape (features,)")
    return x, _target(y, source, task)


def _target(y: Any, source: str, task: Task) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu()
        if y.dtype == torch.bfloat16:  # numpy has no bfloat16
            y = y.float()
    array = np.asarray(y)
    if task.name == "classify":
        if array.size != 1:
            raise UserError(f"{source}: a sample's label has shape {array.shape}: give one "
                            "integer class id per sample (an int or a 0-d tensor), not one-hot")
        array = array.reshape(())  # a label of shape (1,) too
    elif task.name == "sequence" and array.ndim != 1:
        raise UserError(f"{source}: a sample's target has shape {array.shape}: --task sequence "
                        "needs token ids of shape (T,) per sample")
    return task.target(array, source)
