"""Bounded staleness for Downpour (`--max-staleness s`, stale synchronous parallel): the
clock gap stays within s, the shards' staleness within what s implies, lockstep (s = 0)
trains, and a lost replica stops counting instead of stopping the others."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

import distbelief
from distbelief.algorithms.downpour.staleness import Clocks, release_lost
from distbelief.metrics.log import read_metrics

from _cluster import role_pid, wait_until

REPLICAS, BOUND, STEPS = 3, 2, 150
JOB = dict(dataset="digits", model="mlp", replicas=REPLICAS, shards=2, steps=STEPS,
           log_every=1, slow_worker=f"{REPLICAS - 1}:4")


def event_gaps(run_dir) -> list[int]:
    """At each train event: the reporting replica's steps minus the fewest any other
    replica had reported by then."""
    latest: dict[int, int] = {}
    gaps = []
    for e in read_metrics(run_dir / "metrics.jsonl"):
        if e["event"] != "train":
            continue
        latest[e["replica"]] = e["step"]
        if len(latest) == REPLICAS:
            gaps.append(e["step"] - min(latest.values()))
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
        c.before_step()
        c.after_step()
    released = threading.Event()

    def second_step():
        clocks[0].before_step()  # clock 1, bound 1: needs the slowest at 0: goes
        clocks[0].after_step()
        clocks[0].before_step()  # clock 2: needs every live clock >= 1: waits for replica 2
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

    def victim():
        if not (run_dir / "metrics.jsonl").exists():
            return None
        trained = any(e["event"] == "train" and e["step"] >= 20
                      for e in read_metrics(run_dir / "metrics.jsonl"))
        return role_pid(run_dir, "replica", 1) if trained else None

    os.kill(wait_until(victim, 90, "the replicas to train"), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lost_replicas"] == [1]
    steps = {e["replica"]: e["step"] for e in read_metrics(run_dir / "metrics.jsonl")
             if e["event"] == "train"}
    assert steps[0] == steps[2] == 800
