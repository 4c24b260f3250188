"""How many layers each pipeline stage gets.

A pipeline is as fast as its slowest stage, so `balance_by_cost` splits the
layers into contiguous groups minimising the largest group's summed cost. The
cost of a layer comes from `layer_costs` (measured compute time and parameter
bytes) or anything else the caller likes. `check_balance` and
`parse_balance` validate a user's ``--balance`` by hand.

Tie-break: among the optimal splits `balance_by_cost` returns the one whose
list of group sizes is lexicographically smallest, i.e. earlier stages take as
few layers as they can. Under the 1F1B schedule stage k keeps the activations
of up to K-k micro-batches, so the earlier stages are the ones short of memory.

Example::

    >>> balance_by_cost([1, 1, 1, 1], 2)
    [2, 2]
    >>> balance_by_cost([1, 1, 1], 2)   # [1, 2] and [2, 1] tie: earlier stage gets fewer
    [1, 2]
    >>> parse_balance("3,2")
    [3, 2]
    >>> check_balance([3, 2], layers=6, parts=2)
    Traceback (most recent call last):
    ...
    distbelief.errors.UserError: --balance 3,2 sums to 5 but the model has 6 layers: make the counts add up to 6
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from fractions import Fraction

from distbelief.errors import UserError


def _check_parts(parts: int, layers: int) -> None:
    if parts < 1:
        raise UserError(f"--partitions must be >= 1, got {parts}: give at least one partition")
    if parts > layers:
        raise UserError(f"--partitions {parts} is more than the model's {layers} layers: "
                        f"use at most {layers} partitions")


def _check_costs(name: str, values: list[float]) -> None:
    for i, c in enumerate(values):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"{name}[{i}] must be a finite number >= 0, got {c!r}")


def balance_by_cost(costs: list[float], parts: int) -> list[int]:
    """Split ``len(costs)`` layers into `parts` contiguous non-empty groups
    minimising the largest group's summed cost; return the group sizes.

    Exact: costs are turned into integers (every float is an integer over a
    power of two) and the optimal bound is found by binary search with a
    greedy feasibility check, O(n log range). Ties go to the lexicographically
    smallest list of sizes (see the module docstring).

    Raises UserError if `parts` is < 1 or more than the number of layers, and
    ValueError for a negative or non-finite cost.

    >>> balance_by_cost([1, 6.5, 6.5, 6.5, 21], 2)
    [4, 1]
    """
    n = len(costs)
    _check_parts(parts, n)
    _check_costs("costs", costs)
    fractions = [Fraction(c) for c in costs]
    scale = max(f.denominator for f in fractions)  # a power of two: every denominator divides it
    ints = [int(f * scale) for f in fractions]
    prefix = [0]
    for c in ints:
        prefix.append(prefix[-1] + c)

    def groups_needed(bound: int) -> list[int]:
        # need[j]: fewest groups of cost <= bound that cover layers j..n-1 (greedy is optimal)
        need = [0] * (n + 1)
        for j in range(n - 1, -1, -1):
            end = bisect_right(prefix, prefix[j] + bound) - 1  # furthest end with sum <= bound
            need[j] = 1 + need[end]
        return need

    lo, hi = max(ints), prefix[-1]  # the optimum lies in [largest layer, everything]
    while lo < hi:
        mid = (lo + hi) // 2
        if groups_needed(mid)[0] <= parts:  # fewer groups can always be split further
            hi = mid
        else:
            lo = mid + 1
    need = groups_needed(lo)
    sizes = []
    start = 0
    for left in range(parts, 1, -1):  # `left` groups still to place, this one included
        # the smallest first group that leaves a feasible rest; need[] is non-increasing
        end = start + 1
        while need[end] > left - 1:
            end += 1
        sizes.append(end - start)
        start = end
    sizes.append(n - start)
    return sizes


def layer_costs(times: list[float], param_bytes: list[int], time_weight: float = 0.5) -> list[float]:
    """One cost per layer from measured compute time and parameter bytes.

    Each list is normalised to sum 1 (an all-zero list stays all zero), then
    ``cost = time_weight * time + (1 - time_weight) * bytes``.

    >>> layer_costs([1.0, 3.0], [300, 100])
    [0.5, 0.5]
    >>> layer_costs([1.0, 3.0], [0, 0], time_weight=1.0)
    [0.25, 0.75]
    """
    if len(times) != len(param_bytes):
        raise ValueError(f"times has {len(times)} layers but param_bytes has {len(param_bytes)}: "
                         "give one entry per layer in both")
    if not 0.0 <= time_weight <= 1.0:
        raise ValueError(f"time_weight must be in [0, 1], got {time_weight!r}")
    _check_costs("times", times)
    _check_costs("param_bytes", param_bytes)

    def normalised(values):
        total = math.fsum(values)
        return [v / total for v in values] if total > 0 else [0.0] * len(values)

    t, b = normalised(times), normalised(param_bytes)
    return [time_weight * ti + (1.0 - time_weight) * bi for ti, bi in zip(t, b)]


def check_balance(balance: list[int], layers: int, parts: int) -> None:
    """Raise UserError, one line naming the values and the fix, unless `balance`
    gives each of `parts` partitions at least one layer and sums to `layers`.

    >>> check_balance([3, 3], layers=6, parts=2)
    >>> check_balance([3, 3], layers=6, parts=3)
    Traceback (most recent call last):
    ...
    distbelief.errors.UserError: --balance 3,3 has 2 entries but --partitions is 3: give one layer count per partition
    """
    _check_parts(parts, layers)
    text = ",".join(str(b) for b in balance)
    if len(balance) != parts:
        raise UserError(f"--balance {text} has {len(balance)} entries but --partitions is {parts}: "
                        "give one layer count per partition")
    small = [b for b in balance if b < 1]
    if small:
        raise UserError(f"--balance {text} gives a partition {small[0]} layers: "
                        "every partition needs at least 1 layer")
    if sum(balance) != layers:
        raise UserError(f"--balance {text} sums to {sum(balance)} but the model has {layers} layers: "
                        f"make the counts add up to {layers}")


_BALANCE = re.compile(r"\s*[0-9]+\s*(,\s*[0-9]+\s*)*")


def parse_balance(text: str) -> list[int]:
    """``"3,2"`` -> ``[3, 2]`` (spaces around the numbers are allowed).

    Raises UserError for anything but comma-separated positive integers.

    >>> parse_balance(" 4, 1 ")
    [4, 1]
    """
    if not isinstance(text, str) or not _BALANCE.fullmatch(text) or \
            any(int(v) < 1 for v in text.split(",")):
        raise UserError(f"--balance must be comma-separated layer counts such as 3,2; got {text!r}")
    return [int(v) for v in text.split(",")]
