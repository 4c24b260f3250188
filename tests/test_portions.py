"""Sandblaster's work hand-out (algorithms/portions.py) as tables, like torchgpipe's
`clock_cycles` tests: scripted events in, the exact assignments out.

A script is a list of steps:

    ("free", w, expected)        next_for(w) must return `expected` (an Assignment or None)
    ("done", w, p, accepted)     finished(w, p, accepted=accepted)
    ("lost", w, unpushed, again) lost(w, unpushed) must return `again`
"""

from __future__ import annotations

import random

import pytest

from distbelief.algorithms.sandblaster.portions import Assignment, Portions, portion_bounds, wants_push
from distbelief.algorithms.sandblaster.reduction import InOrder


def new(p: int, gen: int = 0) -> Assignment:
    return Assignment(p, gen, backup=False)


def backup(p: int, gen: int = 0) -> Assignment:
    return Assignment(p, gen, backup=True)


def play(work: Portions, script: list[tuple]) -> None:
    for i, step in enumerate(script):
        kind, w, *rest = step
        if kind == "free":
            assert work.next_for(w) == rest[0], f"step {i}: {step}"
        elif kind == "done":
            work.finished(w, rest[0], accepted=rest[1])
        elif kind == "lost":
            assert work.lost(w, rest[0]) == rest[1], f"step {i}: {step}"
        else:
            raise AssertionError(f"bad step {step}")


# ---- P=6 portions, W=3 workers, worker 2 slow ---------------------------------------

# Workers 0 and 1 are fast; worker 2 takes portion 2 and sits on it. Until the queue
# is empty every free worker gets the next fresh portion in order.
FRESH = [
    ("free", 0, new(0)), ("free", 1, new(1)), ("free", 2, new(2)),
    ("done", 0, 0, True), ("free", 0, new(3)),
    ("done", 1, 1, True), ("free", 1, new(4)),
    ("done", 0, 3, True), ("free", 0, new(5)),  # the queue is empty from here on
    ("done", 1, 4, True),
]


def test_slow_worker_with_backups():
    work = Portions(6, backups=True)
    play(work, FRESH + [
        # outstanding: 2 (worker 2, handed out 3rd) and 5 (worker 0, 6th): both one copy,
        # so the older one, portion 2, is backed up
        ("free", 1, backup(2)),
        ("done", 0, 5, True),
        # only 2 is outstanding and it already runs max_copies=2 times
        ("free", 0, None),
    ])
    assert work.backups_issued == 1
    assert work.running[2] == [2, 1]
    assert not work.complete
    play(work, [("done", 1, 2, True)])  # the backup wins
    assert work.complete
    assert work.accepted == {0: 0, 1: 1, 2: 1, 3: 0, 4: 1, 5: 0}
    assert work.discarded == 0
    play(work, [("done", 2, 2, False)])  # the slow original arrives late
    assert work.discarded == 1
    assert work.complete
    assert work.running[2] == []
    assert work.accepted[2] == 1


def test_slow_worker_without_backups():
    work = Portions(6, backups=False)
    play(work, FRESH + [
        ("free", 1, None),
        ("done", 0, 5, True),
        ("free", 0, None),
        ("free", 1, None),
    ])
    assert work.backups_issued == 0
    assert not work.complete
    play(work, [("done", 2, 2, True)])
    assert work.complete
    assert work.discarded == 0


def test_slow_worker_three_copies():
    work = Portions(6, backups=True, max_copies=3)
    play(work, FRESH + [
        ("free", 1, backup(2)),
        ("done", 0, 5, True),
        ("free", 0, backup(2)),  # a third copy is allowed now
    ])
    assert work.running[2] == [2, 1, 0]
    assert work.backups_issued == 2
    play(work, [("done", 0, 2, True), ("free", 0, None)])  # accepted: no more copies of 2
    assert work.complete


def test_backup_fewest_copies_then_oldest():
    work = Portions(3, backups=True, max_copies=3)
    play(work, [
        ("free", 0, new(0)), ("free", 1, new(1)), ("free", 2, new(2)),
        ("free", 3, backup(0)),  # all have one copy: the oldest
        ("free", 4, backup(1)),  # 0 has two copies now: 1 and 2 have fewer, 1 is older
        ("done", 2, 2, True),
        ("free", 2, backup(0)),  # 0 and 1 both have two copies: the older
        ("done", 4, 1, True),
        ("free", 4, None),       # 0 runs three times (max), 1 and 2 are accepted
    ])
    assert work.running[0] == [0, 3, 2]
    assert work.backups_issued == 3
    assert work.complete is False
    play(work, [("done", 3, 0, True), ("done", 0, 0, False), ("done", 2, 0, False)])
    assert work.complete
    assert work.discarded == 2


def test_never_a_second_copy_to_the_same_worker():
    work = Portions(2, backups=True, max_copies=5)
    play(work, [
        ("free", 0, new(0)), ("free", 1, new(1)),
        ("free", 0, backup(1)),  # worker 0 asks again while on 0: not 0 again
        ("free", 1, backup(0)),
        ("free", 0, None),       # both compute both
        ("free", 1, None),
    ])
    assert work.running == {0: [0, 1], 1: [1, 0]}


def test_backups_only_after_every_portion_was_handed_out():
    work = Portions(4, backups=True)
    play(work, [
        ("free", 0, new(0)), ("free", 1, new(1)),
        ("done", 0, 0, True), ("free", 0, new(2)), ("free", 2, new(3)),
        ("free", 3, backup(1)),
    ])
    assert work.unassigned == 0


def test_finished_bookkeeping():
    work = Portions(2, backups=True)
    assert (work.complete, work.unassigned, work.discarded) == (False, 2, 0)
    play(work, [("free", 0, new(0)), ("free", 1, new(1)), ("free", 2, backup(0))])
    assert work.unassigned == 0
    play(work, [("done", 2, 0, True)])
    assert work.running[0] == [0] and work.accepted == {0: 2}
    play(work, [("done", 0, 0, False)])
    assert work.running[0] == [] and work.accepted == {0: 2} and work.discarded == 1
    assert not work.complete
    play(work, [("done", 1, 1, True)])
    assert work.complete and work.discarded == 1


def test_no_portions_refused():
    with pytest.raises(ValueError):
        Portions(0, backups=True)


def test_docstring_example():
    work = Portions(8, backups=True)
    a = work.next_for(0)
    assert a == Assignment(portion=0, generation=0, backup=False)
    work.finished(0, a.portion, accepted=True)
    assert work.accepted == {0: 0} and work.unassigned == 7


# ---- lost workers ----------------------------------------------------------------------


def test_lost_requeues_running_and_unpushed_at_the_front():
    work = Portions(6, backups=True)
    play(work, [
        ("free", 0, new(0)), ("free", 1, new(1)),
        ("done", 0, 0, True),            # accepted, not yet pushed
        ("free", 0, new(2)),
        ("lost", 0, {0}, [0, 2]),        # its running 2 and its unpushed 0
    ])
    assert work.generation == [1, 0, 1, 0, 0, 0]
    assert 0 not in work.accepted
    assert list(work.queue) == [0, 2, 3, 4, 5]  # first in line, in order
    play(work, [
        ("free", 2, new(0, gen=1)), ("free", 3, new(2, gen=1)), ("free", 4, new(3)),
    ])


def test_lost_keeps_what_others_compute_or_won():
    work = Portions(4, backups=True)
    play(work, [
        ("free", 0, new(0)), ("free", 1, new(1)), ("free", 2, new(2)),
        ("done", 0, 0, True), ("free", 0, new(3)),
        ("done", 1, 1, True),
        ("free", 1, backup(2)),          # 2 runs on workers 2 and 1
        # worker 2 dies: 2 still runs on worker 1; worker 1's accepted 1 is not 2's to lose
        ("lost", 2, {1}, []),
    ])
    assert work.generation == [0, 0, 0, 0]
    assert work.running[2] == [1]
    assert work.accepted == {0: 0, 1: 1}
    assert work.unassigned == 0
    play(work, [
        ("free", 2, backup(2)),          # (a fresh worker 2 may back it up again)
        ("done", 2, 2, True),
        # worker 1 dies while on 2, already won by worker 2: nothing to redo;
        # its pushed answer (1, not in unpushed) stays accepted
        ("lost", 1, set(), []),
    ])
    assert work.accepted == {0: 0, 1: 1, 2: 2}
    assert work.unassigned == 0
    play(work, [("done", 0, 3, True)])
    assert work.complete


def test_a_backup_refused_because_the_dead_original_claimed_first():
    """Worker 1 claims portion 0, then dies before its answer arrives; `lost` leaves
    the portion to the backup on worker 0, whose answer is then refused (the claim
    was taken): the portion goes out again with a new generation."""
    work = Portions(2, backups=True)
    play(work, [
        ("free", 1, new(0)), ("free", 2, new(1)), ("free", 0, backup(0)),
        ("lost", 1, set(), []),          # 0 still runs on worker 0: nothing to redo yet
        ("done", 2, 1, True),
        ("done", 0, 0, False),           # refused: the dead worker 1 had claimed it
        ("free", 2, new(0, gen=1)),
        ("done", 2, 0, True),
    ])
    assert work.complete and work.accepted == {0: 2, 1: 2}


def test_no_backup_of_a_generation_another_copy_claimed():
    """Regression: worker 1 claims portion 1 and dies before answering. The backup on
    worker 0 is refused; handing out backups of the same generation again (to worker 0,
    then to worker 2 beside it) refused them one after the other for ever, and the
    driver's evaluation never ended. A refused generation is backed up no more; once the
    dead claimer is lost, the portion goes out with a new generation."""
    work = Portions(2, backups=True)
    play(work, [
        ("free", 1, new(0)), ("free", 2, new(1)),
        ("done", 1, 0, True),
        ("free", 1, backup(1)),          # worker 1 backs up 1 ... and claims it, and dies
        ("done", 2, 1, False),           # worker 2's original is refused: 1 claimed it
        ("free", 2, None),               # no backup of a claimed generation
        ("free", 0, None),
        ("lost", 1, set(), [1]),         # the claimer is gone: out again, a new generation
        ("free", 0, new(1, gen=1)),
        ("done", 0, 1, True),
    ])
    assert work.complete and work.accepted == {0: 1, 1: 0}


def test_a_refused_copy_with_others_running_stops_the_backups_until_they_end():
    """The other order: worker 1 (the claimer) is lost first while a backup runs on 0,
    another idle worker may back it up once; each refused answer leaves the rest, and the
    last one hands the portion out anew."""
    work = Portions(1, backups=True)
    play(work, [
        ("free", 1, new(0)), ("free", 0, backup(0)),
        ("lost", 1, set(), []),          # 0 still runs on worker 0
        ("free", 2, backup(0)),          # not refused yet: one more copy
        ("done", 0, 0, False),           # refused: no more backups of generation 0
        ("free", 0, None),
        ("done", 2, 0, False),           # the last copy: out again
        ("free", 0, new(0, gen=1)),
        ("done", 0, 0, True),
    ])
    assert work.complete


def test_lost_twice_bumps_generation_again():
    work = Portions(3, backups=False)
    play(work, [
        ("free", 0, new(0)),
        ("lost", 0, set(), [0]),
        ("free", 1, new(0, gen=1)),
        ("lost", 1, set(), [0]),
        ("free", 2, new(0, gen=2)),
        ("free", 2, new(1)),
    ])


def test_lost_worker_with_nothing():
    work = Portions(3, backups=True)
    play(work, [("free", 0, new(0)), ("lost", 5, set(), []), ("lost", 5, {0}, [])])
    assert work.generation == [0, 0, 0]
    assert list(work.queue) == [1, 2]


# ---- randomised runs: the invariants behind the tables ----------------------------------


@pytest.mark.parametrize("backups", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_random_runs_finish_and_keep_invariants(seed, backups):
    rng = random.Random(seed)
    count, workers = rng.randint(1, 12), rng.randint(1, 5)
    max_copies = rng.randint(1, 3)
    work = Portions(count, backups=backups, max_copies=max_copies)
    computing: dict[int, Assignment] = {}
    alive = set(range(workers))
    claims: set[tuple[int, int]] = set()       # (portion, generation) answered first
    won: dict[int, int] = {}                   # portion -> worker, as the driver sees it
    unpushed: dict[int, set[int]] = {w: set() for w in alive}
    for _ in range(1000):
        for w in sorted(alive - set(computing)):
            queued = work.unassigned
            a = work.next_for(w)
            if a is None:
                continue
            assert a.backup == (queued == 0)
            assert backups or not a.backup
            assert a.portion not in work.accepted
            assert a.generation == work.generation[a.portion]
            computing[w] = a
            copies = work.running[a.portion]
            assert copies.count(w) == 1
            assert len(copies) <= (max_copies if a.backup else max(max_copies, 1))
        if work.complete:
            break
        assert computing, "nothing running and not complete"
        w = rng.choice(sorted(computing))
        if rng.random() < 0.05 and len(alive) > 1:
            alive.discard(w)
            dying = computing.pop(w)
            if rng.random() < 0.5:  # it claimed its answer, then died before sending it
                claims.add((dying.portion, dying.generation))
            for p in list(unpushed[w]):
                del won[p]
            work.lost(w, unpushed.pop(w))
            continue
        a = computing.pop(w)
        accepted = (a.portion, a.generation) not in claims
        claims.add((a.portion, a.generation))
        work.finished(w, a.portion, accepted=accepted)
        if accepted:
            assert a.portion not in won
            won[a.portion] = w
            unpushed[w].add(a.portion)
            if rng.random() < 0.5:
                unpushed[w].clear()
    else:
        pytest.fail("the batch never completed")
    assert work.complete
    assert won == work.accepted
    assert sorted(won) == list(range(count))


# ---- wants_push ------------------------------------------------------------------------

@pytest.mark.parametrize("unpushed, push_every, unassigned, expected", [
    (0, 1, 0, False),   # nothing to push, ever
    (0, 4, 5, False),
    (1, 4, 5, False),   # below the cadence, work left to hand out
    (3, 4, 1, False),
    (4, 4, 5, True),    # the cadence
    (5, 4, 5, True),
    (1, 1, 9, True),
    (1, 4, 0, True),    # nothing left to hand out: push what there is
    (3, 4, 0, True),
])
def test_wants_push(unpushed, push_every, unassigned, expected):
    assert wants_push(unpushed, push_every, unassigned) is expected


# ---- portion_bounds --------------------------------------------------------------------

def test_portion_bounds_table():
    assert [portion_bounds(10, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [portion_bounds(4, 4, i) for i in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [portion_bounds(7, 1, i) for i in range(1)] == [(0, 7)]


@pytest.mark.parametrize("samples, portions", [
    (10, 3), (7, 7), (1, 1), (100, 8), (13, 4), (1797, 30), (1000, 7), (64, 64), (65, 64),
])
def test_portion_bounds_cover_exactly_once(samples, portions):
    bounds = [portion_bounds(samples, portions, i) for i in range(portions)]
    covered = [s for start, stop in bounds for s in range(start, stop)]
    assert covered == list(range(samples))  # no gap, no overlap, in order
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == samples


# ---- InOrder: the fixed summation order (algorithms/sandblaster/reduction.py) ----------

@pytest.mark.parametrize("count, pushes, added", [
    # pushes as they arrive -> what each arrival lets the driver add, in order
    (1, [[0]], [[0]]),
    (4, [[0, 1, 2, 3]], [[0, 1, 2, 3]]),
    (4, [[3, 2, 1, 0]], [[0, 1, 2, 3]]),               # one push, listed in any order
    (4, [[0], [1], [2], [3]], [[0], [1], [2], [3]]),   # in order: each at once
    (4, [[3], [2], [1], [0]], [[], [], [], [0, 1, 2, 3]]),  # reversed: all at the end
    (4, [[2, 1], [0], [3]], [[], [0, 1, 2], [3]]),     # the docstring's example
    # a slow worker holds portion 0: the others' pushes wait for it
    (6, [[1, 4], [2, 5], [3], [0]], [[], [], [], [0, 1, 2, 3, 4, 5]]),
    # worker A pushed 0, 3; B holds 1 and 2; B pushes them last
    (5, [[0, 3], [4], [1, 2]], [[0], [], [1, 2, 3, 4]]),
])
def test_in_order_table(count, pushes, added):
    order = InOrder(count)
    assert [order.arrived(p) for p in pushes] == added
    assert order.complete


def test_in_order_docstring_example():
    order = InOrder(4)
    assert order.arrived([2, 1]) == []
    assert order.arrived([0]) == [0, 1, 2]
    assert not order.complete
    assert order.arrived([3]) == [3]
    assert order.complete


@pytest.mark.parametrize("pushes", [
    [[0], [0]],          # pushed twice, after it was added
    [[2], [2]],          # pushed twice, while waiting
    [[1, 1]],            # twice in one push
    [[4]], [[-1]],       # out of range
])
def test_in_order_refuses_a_portion_twice_or_out_of_range(pushes):
    order = InOrder(4)
    with pytest.raises(ValueError):
        for p in pushes:
            order.arrived(p)


def test_in_order_needs_a_portion():
    with pytest.raises(ValueError):
        InOrder(0)


@pytest.mark.parametrize("seed", range(10))
def test_in_order_sum_is_the_same_bits_whatever_the_arrival(seed):
    """Portions pushed in random groups and orders, added as `arrived` says: always the
    left-to-right sum in portion order, bit for bit. Float32 addition does not associate:
    adding in arrival order gives other bits for each of these seeds."""
    import torch

    count = 12
    gen = torch.Generator().manual_seed(1000 + seed)
    grads = [torch.randn(50, generator=gen) * 10.0 ** float(torch.randint(-4, 4, (1,),
                                                                      generator=gen))
             for _ in range(count)]
    reference = grads[0].clone()
    for g in grads[1:]:
        reference.add_(g)
    rng = random.Random(seed)
    arrival = list(range(count))
    rng.shuffle(arrival)
    as_arrived = grads[arrival[0]].clone()
    for p in arrival[1:]:
        as_arrived.add_(grads[p])
    assert not torch.equal(as_arrived, reference)  # the order matters here
    order, total, added = InOrder(count), None, []
    while arrival:
        k = rng.randint(1, 4)
        group, arrival = arrival[:k], arrival[k:]
        for p in order.arrived(group):
            added.append(p)
            total = grads[p].clone() if p == 0 else total.add_(grads[p], alpha=1.0)
    assert added == list(range(count))
    assert torch.equal(total, reference)
