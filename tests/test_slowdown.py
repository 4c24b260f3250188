"""--slow-worker: the slow worker sleeps in proportion to its compute, not to its waits.

Regression: a partition of a pipelined replica waits inside its compute block for its
neighbour; sleeping in proportion to that wait made the neighbour wait longer in turn,
and a 4x slow pipeline of two partitions all but stopped after a few steps."""

from __future__ import annotations

import time

import pytest

from distbelief.algorithms.slowdown import Slowdown


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_compute_is_slowed_by_the_factor():
    slow = Slowdown(4.0)
    with slow.compute():
        wall, cpu = time.perf_counter(), time.process_time()
        _spin(0.05)
        # the compute: its CPU time (less than its wall time when the cores are shared)
        took = min(time.perf_counter() - wall, time.process_time() - cpu)
    assert slow.slept == pytest.approx(3 * took, rel=0.2, abs=0.005)


def test_a_wait_inside_the_block_is_not_slowed():
    slow = Slowdown(4.0)
    with slow.compute():
        _spin(0.02)  # at most 0.02 s of CPU, whatever the load
        time.sleep(0.2)  # waiting for a neighbour's activations: no CPU
    assert slow.slept < 3 * 0.03  # about 3 x the 0.02 s of compute, not 3 x 0.22 s


def test_factor_one_never_sleeps():
    fast = Slowdown()
    with fast.compute():
        _spin(0.01)
    assert fast.slept == 0.0
