"""Project Adam's multi-threaded replica: T lock-free workers inside one Downpour replica.

With ``--replica-workers T`` a Downpour replica runs T threads that share its
local copy of the parameters (Chilimbi et al., OSDI 2014, section 3.2). A
*step* is one batch per worker: the replica takes the next T batches of its
stream, in order, and hands batch j to worker j, so the workers' batches
together are exactly the replica's batch sequence. Each worker computes its
gradient (of the job's task's loss) on the shared local copy, adds it into the
replica's push buffer and
applies it to the local copy with plain SGD (`ps.rules.sgd_`) at the job's
``--lr``, all without a lock (Hogwild on the local copy): their reads and
writes interleave, and two additions to one element may race. The step ends
when every worker is done; the fetch and push cadence (``--n-fetch``,
``--n-push``), ``--steps`` and the epoch count (T x batch samples per step)
count these steps, so a push sends the sum of the T gradients of each step
since the last push to the shards, where the update rule runs, and a fetch
overwrites what the workers did to the local copy. T = 1 does not use this
module: the replica computes one gradient per step straight into the push
buffer and leaves its local copy alone.

A worker whose loss or gradient holds NaN or inf (checked on its own gradient,
one reduction, before anything is added) adds nothing to the push buffer and
leaves the local copy alone: only its batch is left out, not the other workers'
nor the window's earlier steps. The replica counts each such batch as a skipped
step (`skipped`).

Example::

    with ReplicaWorkers(flat, threads=2, lr=0.02, timeout=60, task=task_of(cfg)) as workers:
        loss, samples = workers.step(feed, flat.grads[buf])   # batches 2s and 2s+1
        for bad_loss, bad_samples in workers.skipped:         # non-finite, left out
            ...
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from distbelief.model.precision import autocast
from distbelief.model.flat import FlatModel
from distbelief.ps.rules import all_finite, sgd_
from distbelief.task import Task, make_task


class ReplicaWorkers:
    """T threads computing on the replica's local copy (`flat.params`), lock-free.

    `step` is called from the replica's main thread only; it blocks until the T
    workers finished (or `timeout` passes) and re-raises the first worker
    exception with its traceback. `skipped`: (loss, samples) of each batch of the
    last `step` left out for a NaN/inf loss or gradient. `task`: whose loss (None:
    classify's cross-entropy). Context manager: the threads always stop on exit.
    """

    def __init__(self, flat: FlatModel, threads: int, lr: float, timeout: float, *,
                 task: Task | None = None, precision: str = "fp32"):
        self.flat, self.threads, self.lr, self.timeout = flat, threads, lr, timeout
        self.task = task or make_task()
        self.precision = precision  # on the CPU: --replica-workers refuses a device
        self._grads = [torch.zeros(flat.numel) for _ in range(threads)]  # each worker's own
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="replica-worker")
        self.skipped: list[tuple[float, int]] = []

    def step(self, feed, push: torch.Tensor) -> tuple[float, int]:
        """One step: batch j of the feed's next T goes to worker j. (mean loss, samples)
        of the batches whose loss and gradient were finite (NaN, 0 if none); the others
        are in `skipped`."""
        batches = [feed.next() for _ in range(self.threads)]  # the feed is not thread-safe
        futures = [self._pool.submit(self._work, j, xb, yb, push)
                   for j, (xb, yb) in enumerate(batches)]
        results = [(*f.result(self.timeout), len(yb)) for f, (_, yb) in zip(futures, batches)]
        self.skipped = [(loss, n) for loss, finite, n in results if not finite]
        losses = [loss for loss, finite, _ in results if finite]
        samples = sum(n for _, finite, n in results if finite)
        return (sum(losses) / len(losses) if losses else math.nan), samples

    def _work(self, j: int, xb: torch.Tensor, yb: torch.Tensor,
              push: torch.Tensor) -> tuple[float, bool]:
        """Worker j's batch: (loss, whether its loss and gradient were finite and used)."""
        with autocast(self.precision):  # a context per thread: autocast's state is per thread
            loss = self.task.loss(self.flat.model(xb), yb)
        # autograd.grad leaves .grad alone: this worker's gradient is its own until added in
        parts = torch.autograd.grad(loss, self.flat.parameters)
        grad = torch.cat([g.reshape(-1) for g in parts], out=self._grads[j])
        value = loss.item()
        if not (math.isfinite(value) and all_finite(grad)):
            return value, False  # it would spoil the push and the local copy: left out
        push.add_(grad)  # no lock: a concurrent add may race, as Hogwild allows
        sgd_(self.flat.params, grad, lr=self.lr)
        return value, True

    def __enter__(self) -> ReplicaWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
