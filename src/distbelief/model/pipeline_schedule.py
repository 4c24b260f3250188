"""Pipeline schedules: which micro-batch each stage works on, and in what order.

A batch is cut into M micro-batches that flow through K stages (stage k holds
a contiguous run of layers). Forward F(m) goes from stage 0 to K-1; backward
B(m) comes back from K-1 to 0. Everything here is a pure function of
(M, K, kind), so it is tested with exact tables.

Two kinds, both with every stage running forwards in increasing micro-batch
order and backwards in increasing micro-batch order (the executing code relies
on that):

- ``"gpipe"``: all M forwards, then all M backwards (fill, drain). Every stage
  keeps the activations of all M micro-batches.
- ``"1f1b"`` (PipeDream-flush): a warm-up of ``min(M, K-1-k)`` forwards, then
  one forward / one backward alternately, then the remaining backwards. Same
  bubble as GPipe for uniform op times, but stage k holds at most
  ``min(M, K-k)`` micro-batches' activations at a time.

Example::

    >>> clock_cycles(3, 2)
    [[(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1)], [(2, 1)]]
    >>> stage_ops(4, 2, 0, "1f1b")
    [('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('F', 3), ('B', 2), ('B', 3)]
    >>> stage_ops(2, 2, 1, "gpipe")
    [('F', 0), ('F', 1), ('B', 0), ('B', 1)]
    >>> result = simulate(4, 2, "1f1b", forward_time=1.0, backward_time=2.0)
    >>> result["makespan"], result["bubble"], result["max_in_flight"]
    (15.0, 0.2, [2, 1])
"""

from __future__ import annotations

import math

KINDS = ("gpipe", "1f1b")

Op = tuple[str, int]


def _check_counts(micro_batches: int, stages: int) -> None:
    for name, value in (("micro_batches", micro_batches), ("stages", stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown pipeline schedule kind {kind!r}: use one of {', '.join(KINDS)}")


def clock_cycles(micro_batches: int, stages: int) -> list[list[tuple[int, int]]]:
    """The GPipe forward clock: tick t holds the (micro_batch, stage) pairs with
    micro_batch + stage == t, in increasing stage order (torchgpipe's table).

    There are ``micro_batches + stages - 1`` ticks.

    >>> clock_cycles(2, 3)
    [[(0, 0)], [(1, 0), (0, 1)], [(1, 1), (0, 2)], [(1, 2)]]
    """
    _check_counts(micro_batches, stages)
    return [[(t - k, k) for k in range(max(0, t - micro_batches + 1), min(t + 1, stages))]
            for t in range(micro_batches + stages - 1)]


def stage_ops(micro_batches: int, stages: int, stage: int, kind: str = "1f1b") -> list[Op]:
    """The exact order of operations stage `stage` runs: ``("F", m)`` is the
    forward of micro-batch m, ``("B", m)`` its backward.

    Forwards and backwards are each in increasing m; every F and B of
    0..M-1 appears once, and B(m) comes after F(m).

    >>> stage_ops(4, 3, 0)  # warm-up of 2 forwards, then 1F1B, then cool-down
    [('F', 0), ('F', 1), ('F', 2), ('B', 0), ('F', 3), ('B', 1), ('B', 2), ('B', 3)]
    >>> stage_ops(4, 3, 2)  # the last stage has no warm-up
    [('F', 0), ('B', 0), ('F', 1), ('B', 1), ('F', 2), ('B', 2), ('F', 3), ('B', 3)]
    """
    _check_counts(micro_batches, stages)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < stages:
        raise ValueError(f"stage must be in 0..{stages - 1}, got {stage!r}")
    _check_kind(kind)
    m = micro_batches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(m, stages - 1 - stage)
    ops: list[Op] = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        ops += [("F", warmup + i), ("B", i)]
    ops += [("B", i) for i in range(m - warmup, m)]  # cool-down
    return ops


def simulate(micro_batches: int, stages: int, kind: str = "1f1b",
             forward_time: float = 1.0, backward_time: float = 2.0) -> dict:
    """Event simulation of all stages running `stage_ops` in order.

    Returns ``{"makespan", "bubble", "start", "max_in_flight"}``: see
    `simulate_ops`. Raises RuntimeError if the schedule deadlocks (neither
    kind does; the tests check it over many (M, K)).

    >>> simulate(4, 2, "gpipe")["makespan"]
    15.0
    """
    _check_counts(micro_batches, stages)
    _check_kind(kind)
    ops = [stage_ops(micro_batches, stages, k, kind) for k in range(stages)]
    return simulate_ops(ops, forward_time, backward_time)


def simulate_ops(ops: list[list[Op]], forward_time: float = 1.0,
                 backward_time: float = 2.0) -> dict:
    """Simulate stages running the given per-stage op lists (``ops[k]`` for
    stage k) in order; each op starts as soon as its stage is free and its
    dependency has finished:

    - F(m) on stage k > 0 needs F(m) on stage k-1;
    - B(m) on the last stage needs F(m) on it;
    - B(m) on stage k < K-1 needs B(m) on stage k+1.

    Returns a dict with

    - ``"makespan"``: when the last op finishes;
    - ``"bubble"``: the idle fraction of stage-time,
      ``1 - total_busy / (stages * makespan)``, computed as
      ``idle / (stages * makespan)`` (0.0 when the makespan is 0);
    - ``"start"``: ``{(op, m, k): start_time}`` with op ``"F"`` or ``"B"``;
    - ``"max_in_flight"``: per stage, the largest number of micro-batches
      forwarded but not yet backwarded.

    Raises RuntimeError("pipeline schedule deadlocks ...") when no stage can
    start its next op (an order with a dependency cycle), and ValueError for a
    malformed op or negative times.

    >>> simulate_ops([[("F", 0), ("B", 0)], [("F", 0), ("B", 0)]])["start"]
    {('F', 0, 0): 0.0, ('F', 0, 1): 1.0, ('B', 0, 1): 2.0, ('B', 0, 0): 4.0}
    """
    for name, value in (("forward_time", forward_time), ("backward_time", backward_time)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    stages = len(ops)
    if stages < 1:
        raise ValueError("ops must hold one op list per stage, got none")
    for k, stage in enumerate(ops):
        for op in stage:
            if op[0] not in ("F", "B"):
                raise ValueError(f"stage {k} has op {op!r}: ops are ('F', m) or ('B', m)")
    duration = {"F": float(forward_time), "B": float(backward_time)}
    finish: dict[tuple[str, int, int], float] = {}
    start: dict[tuple[str, int, int], float] = {}
    nxt = [0] * stages       # index of each stage's next op
    free = [0.0] * stages    # when each stage finishes its current op
    remaining = sum(len(stage) for stage in ops)
    while remaining:
        progressed = False
        for k in range(stages):
            while nxt[k] < len(ops[k]):
                op, m = ops[k][nxt[k]]
                if op == "F":
                    dep = ("F", m, k - 1) if k > 0 else None
                else:
                    dep = ("F", m, k) if k == stages - 1 else ("B", m, k + 1)
                if dep is not None and dep not in finish:
                    break
                t = max(free[k], finish[dep] if dep is not None else 0.0)
                key = (op, m, k)
                if key in start:
                    raise ValueError(f"stage {k} runs {(op, m)!r} twice")
                start[key] = t
                finish[key] = free[k] = t + duration[op]
                nxt[k] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            waiting = {k: ops[k][nxt[k]] for k in range(stages) if nxt[k] < len(ops[k])}
            raise RuntimeError(f"pipeline schedule deadlocks: every stage waits (stage: next op) {waiting}")
    makespan = max(finish.values(), default=0.0)
    busy = sum(duration[op] for stage in ops for op, _ in stage)
    capacity = stages * makespan
    bubble = (capacity - busy) / capacity if capacity > 0 else 0.0
    return {"makespan": makespan, "bubble": bubble, "start": start,
            "max_in_flight": [_max_in_flight(stage) for stage in ops]}


def _max_in_flight(ops: list[Op]) -> int:
    live = peak = 0
    for op, _ in ops:
        live += 1 if op == "F" else -1
        peak = max(peak, live)
    return peak
