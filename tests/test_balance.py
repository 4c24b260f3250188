"""Table tests for distbelief.model.balance: layers per pipeline stage, and --balance validation."""

import doctest
import itertools
import random
from fractions import Fraction

import pytest

from distbelief.errors import UserError
from distbelief.model import balance
from distbelief.model.balance import balance_by_cost, check_balance, layer_costs, parse_balance


@pytest.mark.parametrize("costs, parts, sizes", [
    ([1, 1, 1, 1], 2, [2, 2]),
    ([1, 6.5, 6.5, 6.5, 21], 2, [4, 1]),           # the heavy last layer stands alone
    ([5], 1, [1]),
    ([1, 2, 3], 1, [3]),
    ([1, 2, 3], 3, [1, 1, 1]),
    ([3, 1, 1, 1, 3], 3, [1, 3, 1]),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, [5, 2, 2]),   # 15, 13, 17
    ([0.1, 0.2, 0.3], 2, [2, 1]),                  # exact: 0.1 + 0.2 > 0.3 for these floats
    # ties go to the lexicographically smallest sizes: earlier stages get fewer layers
    ([1, 1, 1], 2, [1, 2]),
    ([1, 1, 1, 1, 1], 3, [1, 2, 2]),
    ([1, 1, 1, 1, 1, 1, 1], 3, [1, 3, 3]),
    ([2, 1, 1, 2], 2, [2, 2]),                      # [2,1 | 1,2] beats [2 | 1,1,2]=4
    ([0, 0, 0], 2, [1, 2]),
    ([4, 0, 0, 4], 2, [1, 3]),                      # zero-cost layers go to the later group
])
def test_balance_by_cost_table(costs, parts, sizes):
    assert balance_by_cost(costs, parts) == sizes


def _brute_force(costs, parts):
    """(optimal max group cost, lexicographically smallest optimal sizes), exactly."""
    n = len(costs)
    exact = [Fraction(c) for c in costs]
    best = None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0,) + cuts + (n,)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        worst = max(sum(exact[a:b]) for a, b in zip(bounds, bounds[1:]))
        if best is None or (worst, sizes) < best:
            best = (worst, sizes)
    return best


def test_balance_by_cost_matches_brute_force():
    rng = random.Random(0)
    draws = [
        lambda: rng.randint(0, 3),             # many ties and zeros
        lambda: rng.randint(1, 100),
        lambda: rng.uniform(0.0, 1.0),
        lambda: rng.choice([0.1, 0.2, 0.3, 0.7, 1e-9, 1e9]),
    ]
    for _ in range(1500):
        draw = rng.choice(draws)
        n = rng.randint(1, 9)
        costs = [draw() for _ in range(n)]
        parts = rng.randint(1, n)
        sizes = balance_by_cost(costs, parts)
        assert (len(sizes), sum(sizes)) == (parts, n) and min(sizes) >= 1
        assert _brute_force(costs, parts)[1] == sizes, (costs, parts)


def test_balance_by_cost_many_layers():
    costs = [1.0] * 1000
    assert balance_by_cost(costs, 8) == [125] * 8
    assert balance_by_cost(costs, 3) == [332, 334, 334]  # optimum 334; the tie-break front-loads the slack


@pytest.mark.parametrize("costs, parts, message", [
    ([1, 1], 3, "--partitions 3 is more than the model's 2 layers: use at most 2 partitions"),
    ([1, 1], 0, "--partitions must be >= 1, got 0: give at least one partition"),
    ([], 1, "--partitions 1 is more than the model's 0 layers: use at most 0 partitions"),
])
def test_balance_by_cost_user_errors(costs, parts, message):
    with pytest.raises(UserError) as info:
        balance_by_cost(costs, parts)
    assert str(info.value) == message


@pytest.mark.parametrize("costs", [[1, -1], [1, float("nan")], [float("inf"), 1]])
def test_balance_by_cost_rejects_bad_costs(costs):
    with pytest.raises(ValueError):
        balance_by_cost(costs, 1)


@pytest.mark.parametrize("times, param_bytes, weight, costs", [
    ([1.0, 3.0], [300, 100], 0.5, [0.5, 0.5]),
    ([1.0, 3.0], [300, 100], 1.0, [0.25, 0.75]),
    ([1.0, 3.0], [300, 100], 0.0, [0.75, 0.25]),
    ([1.0, 1.0], [0, 0], 0.5, [0.25, 0.25]),      # all-zero bytes stay zero
    ([0.0, 0.0], [0, 0], 0.5, [0.0, 0.0]),
    ([2.0, 2.0, 4.0], [1, 1, 2], 0.25, [0.25, 0.25, 0.5]),
])
def test_layer_costs_table(times, param_bytes, weight, costs):
    assert layer_costs(times, param_bytes, weight) == pytest.approx(costs)


@pytest.mark.parametrize("times, param_bytes, weight", [
    ([1.0], [1, 2], 0.5),
    ([1.0, 2.0], [1, 2], 1.5),
    ([1.0, -2.0], [1, 2], 0.5),
    ([1.0, 2.0], [1, float("nan")], 0.5),
])
def test_layer_costs_rejects_bad_input(times, param_bytes, weight):
    with pytest.raises(ValueError):
        layer_costs(times, param_bytes, weight)


@pytest.mark.parametrize("sizes, layers, parts, message", [
    ([3, 2], 5, 3, "--balance 3,2 has 2 entries but --partitions is 3: give one layer count per partition"),
    ([3, 2], 6, 2, "--balance 3,2 sums to 5 but the model has 6 layers: make the counts add up to 6"),
    ([5, 0], 5, 2, "--balance 5,0 gives a partition 0 layers: every partition needs at least 1 layer"),
    ([1, 1, 1], 2, 3, "--partitions 3 is more than the model's 2 layers: use at most 2 partitions"),
    ([], 2, 0, "--partitions must be >= 1, got 0: give at least one partition"),
])
def test_check_balance_messages(sizes, layers, parts, message):
    with pytest.raises(UserError) as info:
        check_balance(sizes, layers, parts)
    assert str(info.value) == message
    assert "\n" not in message


def test_check_balance_accepts_a_valid_split():
    assert check_balance([3, 2, 1], 6, 3) is None
    assert check_balance(balance_by_cost([1, 2, 3, 4], 3), 4, 3) is None


@pytest.mark.parametrize("text, sizes", [
    ("3,2", [3, 2]),
    ("7", [7]),
    (" 4 , 1 ", [4, 1]),
    ("10,20,30", [10, 20, 30]),
])
def test_parse_balance_table(text, sizes):
    assert parse_balance(text) == sizes


@pytest.mark.parametrize("text", ["x", "", "3,", ",3", "3,,2", "3;2", "3,0", "-1,2", "3.5,2", "3 2"])
def test_parse_balance_errors(text):
    with pytest.raises(UserError) as info:
        parse_balance(text)
    assert str(info.value) == f"--balance must be comma-separated layer counts such as 3,2; got {text!r}"


def test_module_docstring_examples():
    failures, tried = doctest.testmod(balance)
    assert tried >= 5 and failures == 0
