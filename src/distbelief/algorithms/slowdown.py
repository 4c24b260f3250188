"""A worker made slower on purpose (``--slow-worker ID:FACTOR``), for tests and benchmarks.

The slow worker sleeps after each piece of compute for (FACTOR - 1) times as
long as that compute took, so it runs FACTOR times slower whatever the machine,
while leaving the cores to the others. Every other worker gets a no-op.

Example::

    slow = Slowdown.for_worker(cfg, ident)
    with slow.compute():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import time
from typing import Iterator

if TYPE_CHECKING:
    from distbelief.job import JobConfig



class Slowdown:
    """Sleeps (factor - 1) x the time spent inside `compute()`; factor 1 does nothing."""

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
        start = time.perf_counter()
        yield
        pause = (self.factor - 1.0) * (time.perf_counter() - start)
        time.sleep(pause)
        self.slept += pause
