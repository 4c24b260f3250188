"""Bounded staleness for Downpour (`--max-staleness s`, stale synchronous parallel): the
clock gap stays within s, the shards' staleness within what s implies, lockstep (s = 0)
trains, and a lost replica stops counting instead of stopping the others."""

from __future__ import annotations

import math
import subprocess
import threading

import pytest

import distbelief
from distbelief.algorithms.downpour.staleness import (Clocks, clock_key, done_key, release_lost,
                                                      resume_step)
from distbelief.metrics.log import read_metrics
from distbelief.runtime.faults import ENV, EXIT_STATUS

from _cluster import CLI, job_summary, kill_when, train_steps

REPLICAS, BOUND, STEPS = 3, 2, 150
JOB = dict(dataset="digits", model="mlp", replicas=REPLICAS, shards=2, steps=STEPS,
           log_every=1, slow_worker=f"{REPLICAS - 1}:4")


def event_gaps(run_dir) -> list[int]:
    """At each train event once every replica has reported: the most steps any replica had
    reported minus the fewest. (Not the reporting replica's own lead: when one replica
    starts so late under load that the others have finished before its first report,
    every event after that is its own, and its own lead is 0 at each.)"""
    latest: dict[int, int] = {}
    gaps = []
    for e in read_metrics(run_dir / "metrics.jsonl"):
        if e["event"] != "train":
            continue
        latest[e["replica"]] = e["step"]
        if len(latest) == REPLICAS:
            gaps.append(max(latest.values()) - min(latest.values()))
    return gaps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job with a 4x slow replica, bounded (s = 2) and unbounded."""
    out = {}
    for name, bound in (("bounded", BOUND), ("unbounded", None)):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        out[name] = distbelief.train(**JOB, max_staleness=bound, run_dir=str(run_dir)), run_dir
    return out


def test_the_clock_gap_stays_within_the_bound(runs):
    summary, run_dir = runs["bounded"]
    bounded = summary["downpour"]
    # measured by the replicas from the store's clocks as they start a step (the events
    # cannot show it exactly: a replica reports a step after its clock ticked, and under
    # load the others may start theirs before that report is in the stream)
    assert bounded["max_clock_gap"] <= BOUND
    assert bounded["staleness_wait_seconds"] > 0  # the fast ones did wait
    unbounded, free_dir = runs["unbounded"]
    # unbounded, the slow replica falls far behind: well past what the events of the
    # bounded run show (a few steps of report lag at most)
    assert max(event_gaps(free_dir)) > 3 * (BOUND + 1)
    assert max(event_gaps(run_dir)) < max(event_gaps(free_dir)) / 3
    assert "max_clock_gap" not in unbounded.get("downpour", {})


def test_the_shards_staleness_stays_within_what_the_bound_implies(runs):
    """While a replica computes one step, another can finish at most 2s + 1 (it started
    at most s behind and can end at most s + 1 ahead): each of the R - 1 others pushes
    at most that often per shard."""
    summary, run_dir = runs["bounded"]
    staleness = [e["staleness"] for e in read_metrics(run_dir / "metrics.jsonl")
                 if e["event"] == "train" and e["staleness"] is not None]
    assert staleness and max(staleness) <= (REPLICAS - 1) * (2 * BOUND + 1)
    assert summary["mean_staleness"] <= (REPLICAS - 1) * (2 * BOUND + 1)


def test_lockstep_still_trains(tmp_path):
    summary = distbelief.train(dataset="digits", model="mlp", replicas=2, shards=2, steps=300,
                               max_staleness=0, run_dir=str(tmp_path / "run"))
    assert summary["downpour"]["max_clock_gap"] == 0
    assert summary["test_accuracy"] >= 0.9


def test_clocks_of_three_replicas_and_a_lost_one(store):
    """In one process: a replica at clock c waits for the slowest to reach c - s; once
    the slow one is lost, the coordinator's release lets the others go on."""
    clocks = [Clocks(store, replica=r, replicas=3, bound=1, start=0, timeout=5)
              for r in range(3)]
    for c in clocks[:2]:  # replicas 0 and 1 finish a step each; 2 finishes none
        c.before_step(0, True)
        c.tick(1)
    released = threading.Event()

    def second_step():
        clocks[0].before_step(1, True)  # step 1, bound 1: needs the slowest at 0: goes
        clocks[0].tick(2)
        clocks[0].before_step(2, True)  # step 2: needs every live clock >= 1: waits for 2
        released.set()

    thread = threading.Thread(target=second_step)
    thread.start()
    assert not released.wait(0.5)
    release_lost(store, 2, 3, 1)  # replica 2 died: it stops counting
    assert released.wait(5)
    thread.join(5)
    assert clocks[0].max_gap == 1 and clocks[0].wait_seconds > 0
    for c in clocks:
        c.close()


def test_a_killed_replica_does_not_stop_the_bounded_others(tmp_path, cli_job):
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "3", "--steps", "800",
                   "--max-staleness", "1", "--log-every", "5", "--run-dir", str(run_dir),
                   "--quiet")

    kill_when(run_dir, lambda steps: max(steps.values(), default=0) >= 20, "replica", 1, 90)
    summary = job_summary(proc, run_dir, 180)
    assert_survivors_finished(summary, run_dir, [1], 800)


# ---- a replica lost at any moment, in one process: the store's keys ------------------

def test_lost_between_its_tick_and_its_announcement_releases_the_waiters(store):
    """Replica 1 is the slowest (clock 1); 0 and 2 (clock 3, bound 1) wait for step 2. 1
    ticks to 2 and dies before it announces: the coordinator's release must announce 2."""
    clocks = [Clocks(store, replica=r, replicas=3, bound=1, start=c, timeout=5)
              for r, c in enumerate((3, 1, 3))]
    assert not store.has(done_key(2))
    store.add(clock_key(1), 1)  # its tick, and then it was killed
    release_lost(store, 1, 3, 1)
    assert store.has(done_key(2)) and store.has(done_key(3))
    for c in clocks[:1]:
        c.before_step(3, False)  # does not block
        assert c.max_gap == 0
    for c in clocks:
        c.close()


def test_lost_before_it_set_its_clock_stops_counting(store):
    """Replica 1 died before its Clocks existed; the others must not count it at 0."""
    release_lost(store, 1, 2, 0)
    clocks = Clocks(store, replica=0, replicas=2, bound=0, start=0, timeout=2)
    for step in range(3):
        clocks.before_step(step, True)  # lockstep with no one: never blocks
        clocks.tick(step + 1)
    assert clocks.wait_seconds == 0
    clocks.close()


def test_a_replacement_never_moves_its_clock_back(store):
    """The lost replica's pushes up to its clock are applied: its replacement resumes there,
    even if the coordinator saw it report fewer steps."""
    old = Clocks(store, replica=1, replicas=2, bound=1, start=0, timeout=2)
    old.tick(7)
    assert resume_step(store, 1, 5) == 7 and resume_step(store, 1, 9) == 9
    new = Clocks(store, replica=1, replicas=2, bound=1, start=5, timeout=2)
    assert new.clock == 7 and store.add(clock_key(1), 0) == 7
    for c in (old, new):
        c.close()


def test_a_fetch_follows_a_wait_and_a_stale_copy(store):
    """--n-fetch 4, bound 1: a replica fetches when its copy may miss a gradient of a step
    before step - 1, even between the cadence's fetches."""
    fast = Clocks(store, replica=0, replicas=2, bound=1, start=0, timeout=2)
    slow = Clocks(store, replica=1, replicas=2, bound=1, start=0, timeout=2)
    assert fast.before_step(0, True)  # the cadence
    fast.tick(1)
    assert not fast.before_step(1, False)  # needs step 0 only: its copy (slowest 0) will do
    fast.tick(2)
    slow.tick(1)
    assert fast.before_step(2, False)  # needs the others' step 0 applied: fetch again
    fast.tick(3)
    for c in (fast, slow):
        c.close()


# ---- a replica lost at any moment, in a job: forced at fault points --------------------

FAULT_STEPS = 40
FAULT_JOB = ("--dataset", "digits", "--model", "mlp", "--replicas", "3", "--shards", "2",
             "--steps", str(FAULT_STEPS), "--max-staleness", "1", "--log-every", "1",
             "--timeout", "60", "--quiet")

# replica 1's 10th tick moves its clock from 9 to 10; the others (bound 1) then wait for it
MOMENTS = {
    # it never set its clock (the others, held 3 s, would count it at 0)
    "before-it-set-its-clock": "staleness.start/replica1/1=exit,"
                               "staleness.start/replica0/1=sleep:3,"
                               "staleness.start/replica2/1=sleep:3",
    # its step 9's push applied, its clock still 9
    "before-its-tick": "staleness.tick.before/replica1/10=exit",
    # clock 10, not announced; held 3 s first, so the others wait for step 10 already
    "during-its-tick": "staleness.tick.before/replica1/10=sleep:3,"
                       "staleness.tick.after/replica1/10=exit",
    "after-its-tick": "staleness.tick.announced/replica1/10=exit",
}


def assert_survivors_finished(summary: dict, run_dir, lost: list[int], steps: int) -> None:
    assert summary["lost_replicas"] == lost
    reached = train_steps(run_dir)
    assert all(reached[r] == steps for r in range(3) if r not in lost), reached


@pytest.mark.parametrize("faults", MOMENTS.values(), ids=MOMENTS.keys())
def test_a_replica_lost_at_any_moment_of_its_tick(tmp_path, cli_job, monkeypatch, faults):
    monkeypatch.setenv(ENV, faults)
    run_dir = tmp_path / "run"
    summary = job_summary(cli_job(*FAULT_JOB, "--run-dir", str(run_dir)), run_dir, 150)
    assert_survivors_finished(summary, run_dir, [1], FAULT_STEPS)
    assert summary["exit_codes"]["replica1"] == EXIT_STATUS
    assert summary["downpour"]["max_clock_gap"] <= 1


def test_a_replica_lost_while_the_others_wait(tmp_path, cli_job, monkeypatch):
    """Replica 1 hangs before its 10th tick: 0 and 2 finish 11 steps and cannot start a 12th.
    2 waits for the store; 0 has read the clocks and is held 3 s before it looks at the keys.
    Then replica 1 is killed."""
    monkeypatch.setenv(ENV, "staleness.tick.before/replica1/10=hang,"
                            "staleness.wait/replica0/12=sleep:3")
    run_dir = tmp_path / "run"
    proc = cli_job(*FAULT_JOB, "--run-dir", str(run_dir))
    kill_when(run_dir, lambda steps: steps.get(0, 0) >= 11 and steps.get(2, 0) >= 11,
              "replica", 1, 90)
    summary = job_summary(proc, run_dir, 150)
    assert_survivors_finished(summary, run_dir, [1], FAULT_STEPS)
    assert train_steps(run_dir).get(1, 0) == 9
    assert summary["downpour"]["staleness_wait_seconds"] > 0


def test_a_replacement_resumes_from_the_lost_replicas_clock(tmp_path, cli_job, monkeypatch):
    """Replica 1 dies right after its 20th tick, before it reports step 20: its replacement
    goes on from its clock (step 21 first), not from the last step it reported (20)."""
    monkeypatch.setenv(ENV, "staleness.tick.after/replica1/20=exit")
    run_dir = tmp_path / "run"
    steps = 30  # the replacement ticks 10 times: it does not reach the fault's 20th
    args = [*FAULT_JOB, "--run-dir", str(run_dir), "--restart-replicas"]
    args[args.index("--steps") + 1] = str(steps)
    summary = job_summary(cli_job(*args), run_dir, 150)
    assert summary["replica_restarts"] == {"1": 1}
    assert_survivors_finished(summary, run_dir, [], steps)
    events = list(read_metrics(run_dir / "metrics.jsonl"))
    restarted = next(i for i, e in enumerate(events) if e["event"] == "replica_restarted")
    assert next(e["step"] for e in events[restarted:]
                if e["event"] == "train" and e["replica"] == 1) == 21
    assert summary["downpour"]["max_clock_gap"] <= 1


# ---- the bound holds with --n-fetch / --n-push > 1 ---------------------------------

def test_the_bound_holds_with_n_fetch_and_n_push(tmp_path):
    """Clocks count applied pushes, and a replica fetches whenever its copy may miss a
    gradient of a step before step - s: the clock gap stays within s, and each other
    replica's pushes between a window's fetch and its push are at most those of 2s + 1 of
    its steps (it started at most s behind and ends at most s + 1 ahead)."""
    bound, n_push, replicas = 1, 2, 3
    run_dir = tmp_path / "run"
    summary = distbelief.train(**{**JOB, "replicas": replicas, "steps": 80}, n_fetch=4,
                               n_push=n_push, max_staleness=bound, run_dir=str(run_dir))
    assert summary["downpour"]["max_clock_gap"] <= bound
    staleness = [e["staleness"] for e in read_metrics(run_dir / "metrics.jsonl")
                 if e["event"] == "train" and e["staleness"] is not None]
    assert staleness
    assert max(staleness) <= (replicas - 1) * math.ceil((2 * bound + 1) / n_push)


def test_a_bound_below_the_push_window_is_refused(tmp_path):
    out = subprocess.run([*CLI, "train", "--dataset", "digits", "--model", "mlp", "--steps",
                          "4", "--n-push", "4", "--max-staleness", "2", "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    line, = out.stderr.strip().splitlines()
    assert "--max-staleness 2" in line and "--n-push 4" in line and "--max-staleness 3" in line
