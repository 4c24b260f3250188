"""Downpour's fetch/push cadence, and the quorum of a step or round that completes on the
fastest replicas, as pure functions (tested with tables).

Steps are numbered from 0. Before step t a replica fetches fresh parameters
when ``t % n_fetch == 0``; after step t it pushes the gradient accumulated since
its last push when ``(t + 1) % n_push == 0``, and after its last step it pushes
whatever is left, so no computed gradient is lost.

Example::

    >>> downpour_schedule(4, n_fetch=2, n_push=3)
    [(0, ('fetch', 'compute')), (1, ('compute',)), (2, ('fetch', 'compute', 'push')), (3, ('compute', 'push'))]
"""

from __future__ import annotations

import math


def fetch_before(step: int, n_fetch: int) -> bool:
    """Whether the replica fetches parameters before computing step `step`."""
    return step % n_fetch == 0


def push_after(step: int, n_push: int, total_steps: int) -> bool:
    """Whether the replica pushes its accumulated gradient after step `step`."""
    return (step + 1) % n_push == 0 or step == total_steps - 1


def downpour_schedule(total_steps: int, n_fetch: int, n_push: int) -> list[tuple[int, tuple[str, ...]]]:
    """The actions of every step, in order: fetch?, compute, push?."""
    table = []
    for step in range(total_steps):
        actions = []
        if fetch_before(step, n_fetch):
            actions.append("fetch")
        actions.append("compute")
        if push_after(step, n_push, total_steps):
            actions.append("push")
        table.append((step, tuple(actions)))
    return table


def steps_per_replica(*, steps: int | None, epochs: float | None, train_samples: int,
                      replicas: int, batch_size: int) -> int:
    """Steps each replica takes: `steps`, or enough for `epochs` passes over the data.

    With epochs, the replicas together see the training set `epochs` times: each
    replica makes `epochs` passes over its own 1/R part.
    """
    if steps is not None:
        return steps
    part = max(1, train_samples // replicas)
    return max(1, math.ceil(epochs * part / min(batch_size, part) - 1e-9))


def quorum_size(fraction: float, replicas: int) -> int:
    """Replicas a step waits for: ceil(fraction * replicas), at least 1.

    >>> [quorum_size(f, 4) for f in (0.25, 0.5, 0.75, 0.9, 1.0)]
    [1, 2, 3, 4, 4]
    """
    return min(replicas, max(1, math.ceil(fraction * replicas - 1e-9)))
