"""The order in which an evaluation's portions are summed: a pure schedule.

Float addition is not associative, so a gradient summed in the order the
workers happen to finish depends on who computed what: a killed worker, a
backup copy that won, or a loaded machine changes the last bits, and L-BFGS
amplifies last bits. Sandblaster therefore sums the portions of a batch in
portion order, ``((p0 + p1) + p2) + ...``, whichever worker computed each one
and in whatever order their pushes arrive; a run that lost a worker then
equals an unkilled run bit for bit.

How (the driver and the worker do the I/O, this module only says what to add
when): a worker sends each accepted portion's gradient into a *slot* of its
own, a shard vector the driver named for that portion (with ``replace``, so a
slot holds exactly one portion's gradient however often it is written). When
a push is reported, `InOrder.arrived` says which slots have become addable: the
longest run of pushed portions that continues the sum. The driver then adds
them into the gradient vector, in order, on the shards (``copy`` for portion 0,
``axpy`` with alpha 1 for the others), and reuses the slot.

Why this and not the others:
- per-worker partial sums (the old way: a worker adds its portions, the shard
  adds the workers' sums) cannot be ordered: which portions a partial sum holds
  depends on the schedule;
- a slot per portion for the whole batch costs ``portions`` vectors on every
  shard; here a slot is freed as soon as the sum has passed it, so the shards
  hold only the portions pushed ahead of the first missing one (a few per
  worker when nobody is slow, at most ``portions - 1``);
- the shard's ``replace`` write and ``axpy`` already exist, so neither the
  shards nor the wire protocol change, and no gradient passes through the
  coordinator. The price is one push round trip per portion instead of one per
  ``push_every`` portions, and one small vector command per portion.

Example::

    order = InOrder(4)
    order.arrived([2, 1])   # []: portion 0 is still missing
    order.arrived([0])      # [0, 1, 2]
    order.arrived([3])      # [3]; order.complete is now True
"""

from __future__ import annotations


class InOrder:
    """Which pushed portions of one evaluation can be added now, in portion order.

    Not thread-safe (the driver's one thread calls it).
    """

    def __init__(self, count: int):
        if count < 1:
            raise ValueError("need at least one portion")
        self.count = count
        self.next = 0                  # the first portion not yet added
        self.waiting: set[int] = set()  # pushed, waiting for an earlier portion

    @property
    def complete(self) -> bool:
        """Every portion has been added."""
        return self.next == self.count

    def arrived(self, portions) -> list[int]:
        """Portions `portions` were pushed; returns those to add now, in the order to add them.

        A portion pushed twice, or out of range, is a bug in the caller: ValueError.
        """
        for p in portions:
            if not 0 <= p < self.count or p < self.next or p in self.waiting:
                raise ValueError(f"portion {p} pushed twice or out of range 0..{self.count - 1}")
            self.waiting.add(p)
        ready = []
        while self.next in self.waiting:
            self.waiting.remove(self.next)
            ready.append(self.next)
            self.next += 1
        return ready

