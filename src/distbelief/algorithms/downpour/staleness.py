"""Bounded staleness for Downpour (``--max-staleness s``): stale synchronous parallel
(Ho et al., NIPS 2013; Petuum's Bosen).

A replica's clock is the number of steps it has finished (its pushes applied).
Before a step, a replica whose clock is c waits until every live replica's
clock is at least c - s, so no replica starts a step more than s steps ahead
of the slowest; s = 0 is lockstep. Clocks are store counters
``ssp/clock/<r>``; whoever moves the slowest live clock to k sets
``ssp/done/<k>``, and a waiter blocks on that key (the store wakes it, no
polling), bounded by ``--timeout``. A lost replica is marked ``ssp/lost/<r>``
and stops counting: the coordinator then sets the keys the survivors reached
(`release_lost`). A replacement takes up its predecessor's clock.

`Clocks` belongs to one replica's main thread.

Example (a replica's loop)::

    clocks = Clocks(store, replica=r, replicas=R, bound=s, start=0, timeout=120)
    for step in range(total):
        clocks.before_step()          # may block until the slowest caught up
        ...compute, push, wait for the push...
        clocks.after_step()
"""

from __future__ import annotations

import time

from distbelief.runtime.store import JobStore


def clock_key(replica: int) -> str:
    return f"ssp/clock/{replica}"


def done_key(clock: int) -> str:
    return f"ssp/done/{clock}"


def lost_key(replica: int) -> str:
    return f"ssp/lost/{replica}"


def slowest(store: JobStore, replicas: int) -> int | None:
    """The lowest clock among the live replicas (None: none is live)."""
    clocks = [store.add(clock_key(r), 0) for r in range(replicas) if not store.has(lost_key(r))]
    return min(clocks) if clocks else None


def announce(store: JobStore, first: int, last: int, bound: int) -> None:
    """Every live replica has finished steps first..last: set their keys, and delete the
    ones no replica can wait for any more (a waiter at clock c wants c - bound)."""
    for k in range(first, last + 1):
        store.set_json(done_key(k), True)
        if k - bound - 2 >= 1:
            store.delete(done_key(k - bound - 2))


class Clocks:
    """One replica's clock and its waits; see the module doc."""

    def __init__(self, store: JobStore, *, replica: int, replicas: int, bound: int, start: int,
                 timeout: float):
        self.store, self.r, self.replicas, self.bound = store, replica, replicas, bound
        self.timeout = timeout
        self.waiter = store.clone()  # a blocking wait holds its connection
        self.clock = start
        self.store.add(clock_key(replica), start - self.store.add(clock_key(replica), 0))
        self.announced = 0
        self.max_gap = 0  # the most steps this replica started ahead of the slowest
        self.wait_seconds = 0.0

    def before_step(self) -> None:
        """Block until every live replica has finished step clock - bound."""
        need = self.clock - self.bound
        low = slowest(self.store, self.replicas)
        # (a replacement may start behind keys that were deleted: the clocks tell)
        if need >= 1 and (low is None or low < need):
            if not self.store.has(done_key(need)):
                began = time.monotonic()
                try:
                    self.waiter.wait_json(done_key(need), self.timeout)
                except TimeoutError:
                    raise TimeoutError(
                        f"replica {self.r}: waited {self.timeout:g} s (--timeout) for every "
                        f"live replica to finish step {need} (--max-staleness {self.bound})"
                    ) from None
                self.wait_seconds += time.monotonic() - began
            low = slowest(self.store, self.replicas)
        if low is not None:
            self.max_gap = max(self.max_gap, self.clock - low)

    def after_step(self) -> None:
        """This replica finished a step (its push applied): tick, and announce what every
        live replica has finished."""
        self.clock = self.store.add(clock_key(self.r), 1)
        low = slowest(self.store, self.replicas)
        if low is not None and low > self.announced:
            announce(self.store, self.announced + 1, low, self.bound)
            self.announced = low

    def close(self) -> None:
        self.waiter.close()


def release_lost(store: JobStore, replica: int, replicas: int, bound: int) -> None:
    """Replica `replica` was lost (not replaced): it stops counting, and the steps every
    survivor has finished are announced (the coordinator calls this)."""
    if not store.has(clock_key(replica)):
        return  # the job is not bounded, or the replica never started
    store.set_json(lost_key(replica), True)
    low = slowest(store, replicas)
    if low is not None:
        announce(store, max(1, store.add(clock_key(replica), 0) + 1), low, bound)
