"""Project Adam's multi-threaded replica: T lock-free workers inside one Downpour replica.

With ``--replica-workers T`` a Downpour replica runs T threads that share its
local copy of the parameters (Chilimbi et al., OSDI 2014, section 3.2). A
*step* is one batch per worker: the replica takes the next T batches of its
stream, in order, and hands batch j to worker j, so the workers' batches
together are exactly the replica's batch sequence. Each worker computes its
gradient on the shared local copy, adds it into the replica's push buffer and
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

Example::

    with ReplicaWorkers(flat, threads=2, lr=0.02, timeout=60) as workers:
        loss, samples = workers.step(feed, flat.grads[buf])   # batches 2s and 2s+1
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from distbelief.model.flat import FlatModel
from distbelief.ps.rules import sgd_


class ReplicaWorkers:
    """T threads computing on the replica's local copy (`flat.params`), lock-free.

    `step` is called from the replica's main thread only; it blocks until the T
    workers finished (or `timeout` passes) and re-raises the first worker
    exception with its traceback. Context manager: the threads always stop on exit.
    """

    def __init__(self, flat: FlatModel, threads: int, lr: float, timeout: float):
        self.flat, self.threads, self.lr, self.timeout = flat, threads, lr, timeout
        self._grads = [torch.zeros(flat.numel) for _ in range(threads)]  # each worker's own
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="replica-worker")

    def step(self, feed, push: torch.Tensor) -> tuple[float, int]:
        """One step: batch j of the feed's next T goes to worker j. (mean loss, samples)."""
        batches = [feed.next() for _ in range(self.threads)]  # the feed is not thread-safe
        futures = [self._pool.submit(self._work, j, xb, yb, push)
                   for j, (xb, yb) in enumerate(batches)]
        losses = [f.result(self.timeout) for f in futures]
        return sum(losses) / len(losses), sum(len(yb) for _, yb in batches)

    def _work(self, j: int, xb: torch.Tensor, yb: torch.Tensor, push: torch.Tensor) -> float:
        loss = F.cross_entropy(self.flat.model(xb), yb)
        # autograd.grad leaves .grad alone: this worker's gradient is its own until added in
        parts = torch.autograd.grad(loss, self.flat.parameters)
        grad = torch.cat([g.reshape(-1) for g in parts], out=self._grads[j])
        value = loss.item()
        push.add_(grad)  # no lock: a concurrent add may race, as Hogwild allows
        if math.isfinite(value):  # a NaN would spoil the local copy until the next fetch
            sgd_(self.flat.params, grad, lr=self.lr)
        return value

    def __enter__(self) -> ReplicaWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
