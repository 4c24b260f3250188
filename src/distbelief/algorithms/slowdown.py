"""A worker made slower on purpose (``--slow-worker ID:FACTOR``), for tests and benchmarks.

The slow worker sleeps after each piece of compute for (FACTOR - 1) times as
long as that compute took, so it runs FACTOR times slower whatever the machine,
while leaving the cores to the others. Every other worker gets a no-op.

"As long as that compute took" is the block's wall time, or its process CPU time
when that is less: a partition of a pipelined replica spends part of its block
waiting for its neighbour's activations, and a sleep in proportion to that wait
made the neighbour wait longer in turn, step after step, until the replica all
but stopped (a 4x slow pipeline of two partitions reached step 5 in 2 s and then
no step in 60 s).

Example::

    slow = Slowdown.for_worker(cfg, ident)
    with slow.compute():
        loss = task.loss(model(x), y)     # task: the job's `distbelief.task.Task`
        loss.backward()
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from distbelief.job import JobConfig


class Slowdown:
    """Sleeps (factor - 1) x the time spent computing inside `compute()` (see the module
    docstring); factor 1 does nothing."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor
        self.slept = 0.0

    @classmethod
    def for_worker(cls, cfg: JobConfig, ident: int) -> Slowdown:
        spec = cfg.cluster.slowdown
        return cls(spec[1] if spec is not None and spec[0] == ident else 1.0)

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        if self.factor == 1.0:
            yield
            return
        start, cpu = time.perf_counter(), time.process_time()
        yield
        took = min(time.perf_counter() - start, time.process_time() - cpu)
        pause = (self.factor - 1.0) * took
        time.sleep(pause)
        self.slept += pause
