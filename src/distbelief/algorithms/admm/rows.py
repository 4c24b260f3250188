"""The dual-layers split's schedules, as pure functions (table tests): which rows each
round trains on and exchanges, in which order one process runs its parts' steps, and
the weights' learning rate round by round.

Every part of every process computes the same rows from (seed, round), so a
boundary exchange sends no indices.

Example::

    >>> [b.tolist() for b in round_batches(4, 0, local_steps=2, batch_size=2, seed=0)]
    [[0, 1], [3, 2]]
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def round_lr(lr: float, round: int, decay_rounds: int) -> float:
    """W's learning rate in `round`: a cosine from `lr` (round 0) to 0 (round
    `decay_rounds` and after); `lr` throughout when `decay_rounds` is 0.

    >>> [round_lr(1.0, r, 4) for r in range(5)]
    [1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0]
    """
    if decay_rounds == 0:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(round, decay_rounds) / decay_rounds))


def round_batches(n: int, round: int, *, local_steps: int, batch_size: int, seed: int
                  ) -> list[torch.Tensor]:
    """Row indices of each local step of `round`: a pure function of its arguments.

    Batch j of the whole run (round r holds ``j = r*local_steps ... + local_steps - 1``)
    is slice ``j mod E`` of epoch ``j // E``'s permutation of the n rows, ``E = n //
    batch_size`` batches per epoch (the last ``n mod batch_size`` rows of each
    permutation sit the epoch out). Every part of every process computes the same rows.

    >>> [b.tolist() for b in round_batches(4, 0, local_steps=2, batch_size=2, seed=0)]
    [[0, 1], [3, 2]]
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size {batch_size} must be in 1..{n} (the number of rows)")
    per_epoch = n // batch_size
    batches, cached = [], {}
    for j in range(round * local_steps, (round + 1) * local_steps):
        epoch, slot = divmod(j, per_epoch)
        if epoch not in cached:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cached[epoch] = torch.randperm(n, generator=gen)
        batches.append(cached[epoch][slot * batch_size:(slot + 1) * batch_size])
    return batches


def touched_rows(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sorted distinct rows of a round's batches: those exchanged at its end."""
    return torch.unique(torch.cat(list(batches)))


def step_order(parts: int, steps: int, *, interleave: bool = False) -> list[tuple[int, int]]:
    """(part, step) pairs in the order one process runs a round's local steps.

    Sequential: part 0's steps, then part 1's, ... Interleaved: step 0 of the last
    part, of the one before, ..., then step 1 ... Both give the same result
    (a part never reads a neighbour's in-round state); tests run both.

    >>> step_order(2, 2), step_order(2, 2, interleave=True)
    ([(0, 0), (0, 1), (1, 0), (1, 1)], [(1, 0), (0, 0), (1, 1), (0, 1)])
    """
    if interleave:
        return [(k, s) for s in range(steps) for k in reversed(range(parts))]
    return [(k, s) for k in range(parts) for s in range(steps)]
