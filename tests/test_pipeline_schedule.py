"""Table tests for distbelief.model.pipeline_schedule: pipeline clock, per-stage op order, simulation."""

import doctest
import itertools
import random

import pytest

from distbelief.model import pipeline_schedule
from distbelief.model.pipeline_schedule import clock_cycles, simulate, simulate_ops, stage_ops


def F(m):
    return ("F", m)


def B(m):
    return ("B", m)


@pytest.mark.parametrize("m, n, table", [
    (1, 1, [[(0, 0)]]),
    (3, 1, [[(0, 0)], [(1, 0)], [(2, 0)]]),
    (1, 3, [[(0, 0)], [(0, 1)], [(0, 2)]]),
    (3, 2, [[(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1)], [(2, 1)]]),
    (2, 3, [[(0, 0)], [(1, 0), (0, 1)], [(1, 1), (0, 2)], [(1, 2)]]),
    (3, 3, [[(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1), (0, 2)], [(2, 1), (1, 2)], [(2, 2)]]),
])
def test_clock_cycles_table(m, n, table):
    assert clock_cycles(m, n) == table


@pytest.mark.parametrize("m, n", list(itertools.product(range(1, 7), range(1, 7))))
def test_clock_cycles_every_pair_once_on_its_diagonal(m, n):
    ticks = clock_cycles(m, n)
    assert len(ticks) == m + n - 1
    pairs = [pair for tick in ticks for pair in tick]
    assert sorted(pairs) == sorted(itertools.product(range(m), range(n)))
    assert all(i + k == t for t, tick in enumerate(ticks) for i, k in tick)
    assert all([k for _, k in tick] == sorted(k for _, k in tick) for tick in ticks)


GPIPE_4 = [F(0), F(1), F(2), F(3), B(0), B(1), B(2), B(3)]


@pytest.mark.parametrize("m, k, kind, per_stage", [
    (4, 2, "gpipe", [GPIPE_4, GPIPE_4]),
    (4, 2, "1f1b", [
        [F(0), F(1), B(0), F(2), B(1), F(3), B(2), B(3)],
        [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3)],
    ]),
    (3, 3, "gpipe", [[F(0), F(1), F(2), B(0), B(1), B(2)]] * 3),
    (3, 3, "1f1b", [
        [F(0), F(1), F(2), B(0), B(1), B(2)],   # warm-up of 2 leaves one steady pair: F2, B0
        [F(0), F(1), B(0), F(2), B(1), B(2)],
        [F(0), B(0), F(1), B(1), F(2), B(2)],
    ]),
    (1, 3, "gpipe", [[F(0), B(0)]] * 3),
    (1, 3, "1f1b", [[F(0), B(0)]] * 3),        # warm-up capped at M
    (2, 4, "gpipe", [[F(0), F(1), B(0), B(1)]] * 4),
    (2, 4, "1f1b", [
        [F(0), F(1), B(0), B(1)],
        [F(0), F(1), B(0), B(1)],
        [F(0), F(1), B(0), B(1)],
        [F(0), B(0), F(1), B(1)],
    ]),
    (5, 3, "1f1b", [
        [F(0), F(1), F(2), B(0), F(3), B(1), F(4), B(2), B(3), B(4)],
        [F(0), F(1), B(0), F(2), B(1), F(3), B(2), F(4), B(3), B(4)],
        [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3), F(4), B(4)],
    ]),
])
def test_stage_ops_table(m, k, kind, per_stage):
    assert [stage_ops(m, k, s, kind) for s in range(k)] == per_stage


def test_default_kind_is_1f1b():
    assert stage_ops(4, 2, 0) == stage_ops(4, 2, 0, "1f1b")


def test_simulate_start_table():
    # M=2, K=2, f=1, b=2: stage 0 waits for stage 1's backwards
    result = simulate(2, 2, "1f1b", forward_time=1.0, backward_time=2.0)
    assert result["start"] == {
        ("F", 0, 0): 0.0, ("F", 1, 0): 1.0, ("B", 0, 0): 4.0, ("B", 1, 0): 7.0,
        ("F", 0, 1): 1.0, ("B", 0, 1): 2.0, ("F", 1, 1): 4.0, ("B", 1, 1): 5.0,
    }
    assert result["makespan"] == 9.0
    assert result["bubble"] == pytest.approx(1 / 3)
    assert result["max_in_flight"] == [2, 1]


@pytest.mark.parametrize("m, k", list(itertools.product(range(1, 9), range(1, 7))))
def test_gpipe_forwards_follow_the_clock(m, k):
    start = simulate(m, k, "gpipe", forward_time=1.0, backward_time=2.0)["start"]
    for t, tick in enumerate(clock_cycles(m, k)):
        assert all(start[("F", i, s)] == t for i, s in tick)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("f, b", [(1.0, 1.0), (1.0, 2.0), (2.0, 3.0)])
@pytest.mark.parametrize("m, k", list(itertools.product(range(1, 9), range(1, 7))))
def test_makespan_and_bubble_of_fill_drain(kind, f, b, m, k):
    result = simulate(m, k, kind, forward_time=f, backward_time=b)
    assert result["makespan"] == (m + k - 1) * (f + b)
    assert result["bubble"] == pytest.approx((k - 1) / (m + k - 1))


@pytest.mark.parametrize("m, k", list(itertools.product(range(1, 9), range(1, 7))))
def test_max_in_flight(m, k):
    assert simulate(m, k, "1f1b")["max_in_flight"] == [min(m, k - s) for s in range(k)]
    assert simulate(m, k, "gpipe")["max_in_flight"] == [m] * k


def _check_order(ops, m):
    assert sorted(ops) == sorted([F(i) for i in range(m)] + [B(i) for i in range(m)])
    assert [i for op, i in ops if op == "F"] == list(range(m))
    assert [i for op, i in ops if op == "B"] == list(range(m))
    assert all(ops.index(F(i)) < ops.index(B(i)) for i in range(m))


def test_random_shapes_are_deadlock_free_and_run_every_op_once():
    rng = random.Random(0)
    shapes = list(itertools.product(range(1, 13), range(1, 9)))
    shapes += [(rng.randint(1, 64), rng.randint(1, 16)) for _ in range(40)]
    for m, k in shapes:
        for kind in ("gpipe", "1f1b"):
            f, b = rng.uniform(0.1, 3.0), rng.uniform(0.1, 3.0)
            for s in range(k):
                _check_order(stage_ops(m, k, s, kind), m)
            result = simulate(m, k, kind, forward_time=f, backward_time=b)  # raises on deadlock
            start = result["start"]
            assert sorted(start) == sorted((op, i, s) for op in "FB" for i in range(m) for s in range(k))
            for i in range(m):  # dependencies are respected
                for s in range(1, k):
                    assert start[("F", i, s)] >= start[("F", i, s - 1)] + f - 1e-9
                    assert start[("B", i, s - 1)] >= start[("B", i, s)] + b - 1e-9
                assert start[("B", i, k - 1)] >= start[("F", i, k - 1)] + f - 1e-9
            assert result["makespan"] == pytest.approx(max(start.values()) + b)
            assert 0.0 <= result["bubble"] < 1.0


def test_1f1b_has_gpipes_makespan_for_any_f_and_b():
    # same f and b on every stage: 1F1B saves memory, not time
    rng = random.Random(1)
    for _ in range(50):
        m, k = rng.randint(1, 16), rng.randint(1, 6)
        f, b = rng.uniform(0.1, 3.0), rng.uniform(0.1, 3.0)
        gpipe = simulate(m, k, "gpipe", forward_time=f, backward_time=b)["makespan"]
        one = simulate(m, k, "1f1b", forward_time=f, backward_time=b)["makespan"]
        assert one == pytest.approx(gpipe)


def test_deadlocking_order_raises():
    # stage 0 wants B0 before F1, but stage 1 runs F1 before B0: a cycle
    ops = [[F(0), B(0), F(1), B(1)], [F(0), F(1), B(0), B(1)]]
    with pytest.raises(RuntimeError, match="pipeline schedule deadlocks"):
        simulate_ops(ops)


def test_zero_times_give_zero_bubble():
    result = simulate(3, 2, forward_time=0.0, backward_time=0.0)
    assert result["makespan"] == 0.0 and result["bubble"] == 0.0


@pytest.mark.parametrize("call", [
    lambda: clock_cycles(0, 2),
    lambda: clock_cycles(2, 0),
    lambda: stage_ops(0, 2, 0),
    lambda: stage_ops(2, 0, 0),
    lambda: stage_ops(2, 2, 2),
    lambda: stage_ops(2, 2, -1),
    lambda: stage_ops(2, 2, 0, "zero-bubble"),
    lambda: simulate(2, 2, "interleaved"),
    lambda: simulate(2, 2, forward_time=-1.0),
    lambda: simulate(2, 2, backward_time=float("nan")),
    lambda: simulate_ops([]),
    lambda: simulate_ops([[("X", 0)]]),
    lambda: simulate_ops([[F(0), F(0), B(0)]]),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_module_docstring_examples():
    failures, tried = doctest.testmod(pipeline_schedule)
    assert tried >= 5 and failures == 0
