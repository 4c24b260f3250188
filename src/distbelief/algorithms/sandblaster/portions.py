"""Sandblaster's work hand-out for one gradient evaluation: a pure schedule.

The training data is cut into many more portions than there are workers.
A worker that becomes free gets the next portion nobody has started; once
every portion has been handed out, a free worker gets a *backup copy* of a
portion still outstanding (the one with the fewest copies running, oldest
first), so one slow machine cannot hold the whole batch back. The first answer
for a portion wins; later ones are discarded and counted.

No clocks, no I/O: the driver tells the schedule what happened and asks it
what to do next, so the hand-out is tested with tables.

Example::

    work = Portions(8, backups=True)
    a = work.next_for(0)             # Assignment(portion=0, generation=0, backup=False)
    work.finished(0, a.portion, accepted=True)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    portion: int
    generation: int  # bumped when a portion is handed out again after its answer was lost
    backup: bool


class Portions:
    """Which portion each free worker computes next; which answers count."""

    def __init__(self, count: int, *, backups: bool, max_copies: int = 2):
        if count < 1:
            raise ValueError("need at least one portion")
        self.count = count
        self.backups = backups
        self.max_copies = max_copies
        self.queue: deque[int] = deque(range(count))
        self.running: dict[int, list[int]] = {}   # portion -> workers computing it
        self.accepted: dict[int, int] = {}        # portion -> worker whose answer won
        self.generation = [0] * count
        self.refused: set[int] = set()            # portions whose generation another copy claimed
        self._order: dict[int, int] = {}          # portion -> when it was first handed out
        self._handed = 0
        self.backups_issued = 0
        self.discarded = 0

    @property
    def complete(self) -> bool:
        """Every portion has an accepted answer."""
        return len(self.accepted) == self.count

    @property
    def unassigned(self) -> int:
        return len(self.queue)

    def next_for(self, worker: int) -> Assignment | None:
        """The work for a free worker, or None when there is nothing useful to give it."""
        if self.queue:
            portion = self.queue.popleft()
            self.running.setdefault(portion, []).append(worker)
            self._order.setdefault(portion, self._handed)
            self._handed += 1
            return Assignment(portion, self.generation[portion], backup=False)
        if not self.backups:
            return None
        # a generation a copy already claimed (an answer of it was refused) is no use to
        # back up: the claimer answers, or dies and `lost` hands the portion out anew
        candidates = [p for p, workers in self.running.items()
                      if workers and p not in self.accepted and p not in self.refused
                      and worker not in workers and len(workers) < self.max_copies]
        if not candidates:
            return None
        portion = min(candidates, key=lambda p: (len(self.running[p]), self._order[p]))
        self.running[portion].append(worker)
        self.backups_issued += 1
        return Assignment(portion, self.generation[portion], backup=True)

    def finished(self, worker: int, portion: int, *, accepted: bool) -> None:
        """A worker answered `portion`; `accepted` is whether its answer was the first.

        A refused answer with no accepted one means another copy claimed this
        generation first: no backup of it is handed out any more (none could win).
        With no copy still running, that claimer died before its answer came (after
        `lost` had left the portion to this one): the portion is handed out again, as
        `lost` does. (Handing out backups of a claimed generation kept two live
        workers computing copies that were refused, one after the other, for ever,
        when the claimer had died: the driver never finished the evaluation.)
        """
        workers = self.running.get(portion, [])
        if worker in workers:
            workers.remove(worker)
        if accepted:
            self.accepted[portion] = worker
            return
        self.discarded += 1
        if portion not in self.accepted:
            self.refused.add(portion)
            if not workers:
                self._again([portion])

    def lost(self, worker: int, unpushed: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """A worker died. Its running portions that nobody else computes, and its accepted
        answers that never reached the shards (`unpushed`), are handed out again (first in
        line, with a new generation). Returns those portions."""
        again = []
        for portion, workers in self.running.items():
            if worker in workers:
                workers.remove(worker)
                if not workers and portion not in self.accepted:
                    again.append(portion)
        for portion in unpushed:
            if self.accepted.get(portion) == worker:
                del self.accepted[portion]
                again.append(portion)
        self._again(again)
        return sorted(again)

    def _again(self, portions: list[int]) -> None:
        """Hand `portions` out again, first in line, with a new generation."""
        for portion in sorted(portions, reverse=True):
            self.generation[portion] += 1
            self.refused.discard(portion)
            self.queue.appendleft(portion)


def wants_push(unpushed: int, push_every: int, unassigned: int) -> bool:
    """Should a worker holding `unpushed` accepted portions send them now?

    Every `push_every` portions, so a worker that dies loses little; and as soon
    as no portion is left to hand out, so the batch can end without waiting for a
    worker that is still busy on a (backed-up) portion.
    """
    return unpushed > 0 and (unpushed >= push_every or unassigned == 0)


def portion_bounds(samples: int, portions: int, index: int) -> tuple[int, int]:
    """[start, stop) of portion `index` when `samples` are cut into `portions` near-equal runs."""
    return index * samples // portions, (index + 1) * samples // portions
