"""Table tests for distbelief.algorithms.schedule: Downpour's fetch/push cadence, and the
bounded-staleness schedule on top of it (downpour.staleness)."""

import doctest
import math

import pytest

from distbelief.algorithms import schedule
from distbelief.algorithms.downpour import staleness
from distbelief.algorithms.downpour.staleness import bounded_schedule, must_fetch, stale, tick_to
from distbelief.algorithms.schedule import (downpour_schedule, fetch_before, push_after,
                                            steps_per_replica)

# the four kinds of step: fetch before computing? push after it?
F = ("fetch", "compute")
C = ("compute",)
FP = ("fetch", "compute", "push")
CP = ("compute", "push")


@pytest.mark.parametrize("total, n_fetch, n_push, table", [
    (0, 1, 1, []),
    (1, 4, 2, [FP]),                                # a single step fetches and pushes
    (3, 1, 1, [FP, FP, FP]),                        # plain SGD: fetch, compute, push every step
    (4, 2, 2, [F, CP, F, CP]),
    (7, 2, 3, [F, C, FP, C, F, CP, FP]),            # last step 6 fetches (6 % 2) and pushes (last)
    (5, 3, 1, [FP, CP, CP, FP, CP]),                # fetch every 3rd step, push every step
    (6, 1, 4, [F, F, F, FP, F, FP]),                # final partial push window: steps 4-5
    (8, 1, 4, [F, F, F, FP, F, F, F, FP]),          # whole windows only: no extra push
    (3, 5, 5, [F, C, CP]),                          # windows longer than the run
])
def test_downpour_schedule_table(total, n_fetch, n_push, table):
    assert downpour_schedule(total, n_fetch, n_push) == list(enumerate(table))


@pytest.mark.parametrize("total", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("n_fetch", [1, 2, 3])
@pytest.mark.parametrize("n_push", [1, 2, 4, 9])
def test_no_gradient_is_lost_and_windows_are_at_most_n_push(total, n_fetch, n_push):
    table = downpour_schedule(total, n_fetch, n_push)
    assert [step for step, _ in table] == list(range(total))
    assert all(actions.count("compute") == 1 for _, actions in table)
    pushes = [step for step, actions in table if "push" in actions]
    fetches = [step for step, actions in table if "fetch" in actions]
    assert pushes[-1] == total - 1  # the last step's gradient is pushed
    windows = [b - a for a, b in zip([-1] + pushes, pushes)]
    assert sum(windows) == total and max(windows) <= n_push
    assert len(pushes) == math.ceil(total / n_push)
    assert fetches[0] == 0 and len(fetches) == math.ceil(total / n_fetch)
    assert all(actions[0] == "fetch" for _, actions in table if "fetch" in actions)
    assert all(actions[-1] == "push" for _, actions in table if "push" in actions)


def test_fetch_before_and_push_after():
    assert [fetch_before(t, 3) for t in range(7)] == [True, False, False, True, False, False, True]
    assert [push_after(t, 3, total_steps=5) for t in range(5)] == [False, False, True, False, True]
    assert [push_after(t, 1, total_steps=3) for t in range(3)] == [True, True, True]


def test_module_docstring_example():
    failures, tried = doctest.testmod(schedule)
    assert tried >= 1 and failures == 0


@pytest.mark.parametrize("steps, epochs, train_samples, replicas, batch_size, expected", [
    (17, None, 1000, 2, 64, 17),       # steps given: taken as is
    (17, 3.0, 1000, 2, 64, 17),        # steps win over epochs
    (None, 1.0, 1000, 4, 50, 5),       # each replica passes once over its 250 samples
    (None, 0.5, 1000, 1, 100, 5),
    (None, 4.0, 1438, 2, 64, 45),      # digits' training split: 4 * 719 / 64 = 44.9
    (None, 2.0, 1000, 1, 300, 7),      # 6.67 rounds to 7
    (None, 1e-9, 1000, 2, 64, 1),      # at least one step
    (None, 3.0, 10, 4, 64, 3),         # batch larger than the part: one step per pass
    (None, 2.0, 3, 8, 32, 2),          # more replicas than samples: parts of one sample
])
def test_steps_per_replica_table(steps, epochs, train_samples, replicas, batch_size, expected):
    assert steps_per_replica(steps=steps, epochs=epochs, train_samples=train_samples,
                             replicas=replicas, batch_size=batch_size) == expected


# ---- bounded staleness (--max-staleness): distbelief.algorithms.downpour.staleness ----------

T, N = True, None


@pytest.mark.parametrize("total, n_fetch, n_push, bound, table", [
    # (step, the slowest clock it waits for, fetch?, its clock after the step)
    (4, 4, 1, 1, [(0, -1, T, 1), (1, 0, False, 2), (2, 1, T, 3), (3, 2, False, 4)]),
    (6, 1, 2, 1, [(0, -1, T, N), (1, 0, T, 2), (2, 1, T, N), (3, 2, T, 4), (4, 3, T, N),
                  (5, 4, T, 6)]),                  # the clock moves only with a push
    (5, 3, 2, 1, [(0, -1, T, N), (1, 0, False, 2), (2, 1, T, N), (3, 2, T, 4),
                  (4, 3, T, 5)]),                  # a stale copy is fetched between the cadence's
    (6, 8, 1, 2, [(0, -2, T, 1), (1, -1, False, 2), (2, 0, False, 3), (3, 1, T, 4),
                  (4, 2, False, 5), (5, 3, False, 6)]),  # bound 2: fetch every 3rd step at least
    (3, 2, 4, 3, [(0, -3, T, N), (1, -2, False, N), (2, -1, T, 3)]),  # one partial window
    (3, 1, 1, 0, [(0, 0, T, 1), (1, 1, T, 2), (2, 2, T, 3)]),  # lockstep
])
def test_bounded_schedule_table(total, n_fetch, n_push, bound, table):
    assert bounded_schedule(total, n_fetch, n_push, bound) == table


@pytest.mark.parametrize("total", [1, 5, 12])
@pytest.mark.parametrize("n_fetch", [1, 2, 5])
@pytest.mark.parametrize("n_push", [1, 2, 4])
@pytest.mark.parametrize("extra", [0, 1, 3])
def test_bounded_schedule_keeps_the_bound(total, n_fetch, n_push, extra):
    """Every step computes on a copy fetched once the slowest clock was at least
    step - bound; the clock moves exactly at the pushes, to the step after; and the
    replica holding the slowest clock never waits (bound >= n_push - 1)."""
    bound = n_push - 1 + extra
    clock, fetched = 0, None
    for step, need, fetch, after in bounded_schedule(total, n_fetch, n_push, bound):
        assert need <= clock  # it never waits for itself
        fetched = clock if fetch else fetched
        assert fetched >= need
        assert fetch or not fetch_before(step, n_fetch)
        assert after == (step + 1 if push_after(step, n_push, total) else None)
        clock = after if after is not None else clock
    assert clock == total


def test_tick_to_and_must_fetch():
    assert [tick_to(t, 3, 5) for t in range(5)] == [None, None, 3, None, 5]
    # n_fetch 4, bound 1, a copy fetched at slowest clock 2: good for steps up to 3
    assert [must_fetch(t, 4, 1, 2) for t in range(2, 7)] == [False, False, True, True, True]
    assert must_fetch(5, 4, 1, None)  # never fetched
    assert stale(4, 1, 2) and not stale(3, 1, 2) and stale(0, 0, None)


def test_staleness_docstring_example():
    failures, tried = doctest.testmod(staleness)
    assert tried >= 1 and failures == 0
