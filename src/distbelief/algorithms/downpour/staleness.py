"""Bounded staleness for Downpour (``--max-staleness s``): stale synchronous parallel
(Ho et al., NIPS 2013; Petuum's Bosen).

A replica's clock is the number of its steps whose gradients the shards have
applied: it moves only after a push is acknowledged, to the step after the
pushed window (`tick_to`; with ``--n-push n`` it moves n steps at a time, and
a window of non-finite steps only, which sends nothing, moves it too). The
rules, for a replica about to start step t (0-based):

- it waits until every live replica's clock is at least t - s, so no replica
  starts a step more than s steps ahead of the slowest (s = 0 is lockstep);
- it computes on parameters that hold every live replica's gradients of steps
  before t - s: a fetch remembers the slowest clock read before it
  (`Clocks.fetched`), and the replica fetches again, whatever ``--n-fetch``
  says, when that is older than t - s (`must_fetch`); so a fetch follows every
  wait that let the replica go on.

With ``--n-push n`` a replica's clock stands still inside its window, so the
bound must let it finish one: s >= n - 1 (`DownpourConfig`'s validation
refuses less; with it the replica holding the slowest clock never waits).

Clocks are store counters ``ssp/clock/<r>``. Whoever reads the slowest live
clock at k after moving a clock (a tick, or the coordinator's lost mark) sets
``ssp/done/<j>`` for j in k - s..k (`announce`): a waiter at step t blocks on
``ssp/done/<t - s>`` (the store wakes it, no polling), bounded by ``--timeout``.
Because each writer reads the clocks after its own write, of two concurrent
writers at least one sees both; and because the announcement covers every
key a live waiter can want (its step is at least the slowest clock, so it
wants at least k - s), a replica lost anywhere - before its tick, between its
tick and its announcement, after it, or while the others wait - leaves no
key unset: the coordinator marks it ``ssp/lost/<r>`` and announces again
(`release_lost`), whether or not the replica ever set its clock.

A replacement (``--restart-replicas``) never moves the clock backwards: it
resumes at the lost replica's clock (`resume_step`) - the steps its
predecessor's applied pushes already cover - or further when the coordinator
saw it report more steps (their gradients were lost with it). Not at the
slowest live clock: that would redo steps whose gradients are applied.

Test-only fault points (`runtime.faults`), crossed as ``replica<r>``:
``staleness.start`` (before the clock is first set), ``staleness.wait`` (every
step, after the clocks are read and before any wait), ``staleness.tick.before``
(before the clock moves), ``staleness.tick.after`` (moved, not yet announced),
``staleness.tick.announced``.

`Clocks` belongs to one replica's main thread.

Example (a replica's loop)::

    clocks = Clocks(store, replica=r, replicas=R, bound=s, start=0, timeout=120)
    for step in range(total):
        if clocks.before_step(step, fetch_before(step, n_fetch)):  # may block
            ...fetch...
        ...compute...
        if push_after(step, n_push, total):
            ...push, wait for the push...
            clocks.tick(tick_to(step, n_push, total))
"""

from __future__ import annotations

import time

from distbelief.algorithms.schedule import fetch_before, push_after
from distbelief.runtime.faults import fault
from distbelief.runtime.store import JobStore


def clock_key(replica: int) -> str:
    return f"ssp/clock/{replica}"


def done_key(clock: int) -> str:
    return f"ssp/done/{clock}"


def lost_key(replica: int) -> str:
    return f"ssp/lost/{replica}"


# ---- the schedule: pure functions ---------------------------------------------------

def tick_to(step: int, n_push: int, total: int) -> int | None:
    """The clock once step `step`'s push is applied: step + 1 after a push, None (it stands
    still) inside a push window."""
    return step + 1 if push_after(step, n_push, total) else None


def stale(step: int, bound: int, fetched: int | None) -> bool:
    """Whether parameters fetched once the slowest live clock was `fetched` (None: never
    fetched) may miss a gradient of a step before step - bound: too old for step `step`."""
    return fetched is None or fetched < step - bound


def must_fetch(step: int, n_fetch: int, bound: int, fetched: int | None) -> bool:
    """Whether a replica fetches before step `step`: when ``--n-fetch`` says so, or when its
    parameters are `stale`."""
    return fetch_before(step, n_fetch) or stale(step, bound, fetched)


def bounded_schedule(total: int, n_fetch: int, n_push: int, bound: int
                     ) -> list[tuple[int, int, bool, int | None]]:
    """(step, the slowest clock it waits for, fetch?, clock after it) for a replica whose
    own clock is the slowest (the others keep up): what `Clocks` does, step by step.

    >>> bounded_schedule(4, n_fetch=4, n_push=1, bound=1)
    [(0, -1, True, 1), (1, 0, False, 2), (2, 1, True, 3), (3, 2, False, 4)]
    """
    table, clock, fetched = [], 0, None
    for step in range(total):
        fetch = must_fetch(step, n_fetch, bound, fetched)
        if fetch:
            fetched = clock
        after = tick_to(step, n_push, total)
        table.append((step, step - bound, fetch, after))
        clock = after if after is not None else clock
    return table


# ---- the store's side ---------------------------------------------------------------

def slowest(store: JobStore, replicas: int) -> int | None:
    """The lowest clock among the live replicas (None: none is live). A replica that has
    not set its clock yet counts at 0."""
    clocks = [store.add(clock_key(r), 0) for r in range(replicas) if not store.has(lost_key(r))]
    return min(clocks) if clocks else None


def announce(store: JobStore, first: int, last: int, bound: int) -> None:
    """Every live replica has finished steps first..last: set their keys, and delete the
    ones no live replica can wait for any more (a waiter's step is at least the slowest
    clock `last`, so it wants last - bound or later)."""
    for k in range(max(1, first), last + 1):
        store.set_json(done_key(k), True)
        if k - bound - 1 >= 1:
            store.delete(done_key(k - bound - 1))


def resume_step(store: JobStore, replica: int, start: int) -> int:
    """Where a replacement for `replica` starts: `start`, or the lost one's clock if that is
    further (its pushes up to there are applied; the clock never goes back)."""
    return max(start, store.add(clock_key(replica), 0))


class Clocks:
    """One replica's clock and its waits; see the module doc."""

    def __init__(self, store: JobStore, *, replica: int, replicas: int, bound: int, start: int,
                 timeout: float):
        """Set this replica's clock to `start`, or keep it where a predecessor left it if that
        is further (a replacement: see `resume_step`)."""
        self.store, self.r, self.replicas, self.bound = store, replica, replicas, bound
        self.timeout = timeout
        self.who = f"replica{replica}"
        self.waiter = store.clone()  # a blocking wait holds its connection
        fault("staleness.start", self.who)
        current = self.store.add(clock_key(replica), 0)
        self.clock = max(start, current)
        self.store.add(clock_key(replica), self.clock - current)
        self.announced = 0
        self.fetched: int | None = None  # the slowest clock read before the last fetch
        self.max_gap = 0  # the most steps this replica started ahead of the slowest
        self.wait_seconds = 0.0
        self._announce()  # a replacement that resumes further may move the slowest

    def before_step(self, step: int, fetch: bool) -> bool:
        """Block until every live replica has finished step - bound; returns whether to fetch
        before computing (`fetch`: the cadence says so; or the parameters are too old)."""
        need = step - self.bound
        low = slowest(self.store, self.replicas)
        fault("staleness.wait", self.who)
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
        if low is None:  # cannot be: this replica is live; keep the old answer
            return fetch
        self.max_gap = max(self.max_gap, step - low)
        if fetch or stale(step, self.bound, self.fetched):
            self.fetched = low
            return True
        return False

    def tick(self, clock: int) -> None:
        """Steps before `clock` are finished and their pushes applied: move this replica's
        clock there, and announce what every live replica has finished."""
        fault("staleness.tick.before", self.who)
        self.clock = self.store.add(clock_key(self.r), clock - self.clock)
        fault("staleness.tick.after", self.who)
        self._announce()
        fault("staleness.tick.announced", self.who)

    def _announce(self) -> None:
        low = slowest(self.store, self.replicas)
        if low is not None and low > self.announced:
            announce(self.store, max(self.announced + 1, low - self.bound), low, self.bound)
            self.announced = low

    def close(self) -> None:
        self.waiter.close()


def release_lost(store: JobStore, replica: int, replicas: int, bound: int) -> None:
    """Replica `replica` was lost (not replaced): it stops counting, and the steps every
    survivor has finished are announced (the coordinator calls this). It may have been lost
    before it set its clock, or between its tick and its announcement: the keys any live
    waiter can want are all announced again (the slowest live clock k: k - bound..k)."""
    store.set_json(lost_key(replica), True)
    low = slowest(store, replicas)
    if low is not None:
        announce(store, low - bound, low, bound)
