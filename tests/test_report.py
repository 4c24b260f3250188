"""The training workers' reporter (`metrics.report.Reporter`): the "train" events it writes
into a real job store, their cadence, and --on-nonfinite stop."""

from __future__ import annotations

import math
import time

import pytest

from distbelief.job import JobConfig
from distbelief.metrics.report import Reporter
from distbelief.runtime.context import RoleContext
from distbelief.runtime.store import JobStore

# the keys the coordinator reads (`watch.follow_events`); sync's events add "dropped"
KEYS = {"event", "time", "replica", "step", "total_steps", "loss", "nonfinite", "samples",
        "samples_per_second", "staleness", "versions"}


def _events(store: JobStore) -> list[dict]:
    events = store.stream("events").read()
    for e in events:  # the clock-dependent fields, checked here and left out of comparisons
        assert e.pop("time") >= 0 and e.pop("samples_per_second") >= 0
    return events


def _reporter(store: JobStore, **options) -> Reporter:
    return Reporter(store, 3, 10, every=4, start_time=time.time(), **options)


def test_an_event_every_few_steps_with_the_periods_means(store):
    report = _reporter(store)
    for step in range(10):
        report.step(float(step), 8)
        if step == 1:
            report.acks([(0, 2), (1, 4), (2, None)])  # None: refused as non-finite
        report.maybe_log(step, [step, step + 1])
    report.maybe_log(9, [9, 10], force=True)
    report.maybe_log(9, [9, 10], force=True)  # a step already reported is not sent again
    events = _events(store)
    assert [set(e) for e in events] == [KEYS - {"time", "samples_per_second"}] * 3
    assert events == [
        {"event": "train", "replica": 3, "step": 4, "total_steps": 10, "loss": 1.5,
         "nonfinite": 0, "samples": 32, "staleness": 3.0, "versions": [3, 4]},
        {"event": "train", "replica": 3, "step": 8, "total_steps": 10, "loss": 5.5,
         "nonfinite": 0, "samples": 32, "staleness": None, "versions": [7, 8]},
        {"event": "train", "replica": 3, "step": 10, "total_steps": 10, "loss": 8.5,
         "nonfinite": 0, "samples": 16, "staleness": None, "versions": [9, 10]},
    ]
    assert report.acked == 2  # over the whole run


def test_a_nonfinite_loss_is_counted_not_averaged(store):
    report = _reporter(store)
    for step, loss in enumerate([1.0, math.nan, 3.0, math.inf]):
        report.step(loss, 8)
        report.maybe_log(step)
    (event,) = _events(store)
    assert (event["loss"], event["nonfinite"], event["samples"]) == (2.0, 2, 32)
    assert event["versions"] == [] and event["staleness"] is None
    assert not store.has("job/nonfinite")  # skip: the default


def test_a_period_of_nonfinite_losses_only_reports_a_nan_loss(store):
    report = _reporter(store)
    report.skip_nonfinite(8)  # the caller decided to skip without stopping (sync)
    report.maybe_log(9, force=True)
    (event,) = _events(store)
    assert math.isnan(event["loss"]) and event["nonfinite"] == 1 and event["samples"] == 8


def test_nothing_since_the_last_event_sends_nothing(store):
    report = _reporter(store)
    report.maybe_log(3)
    report.maybe_log(9, force=True)
    assert _events(store) == []


def test_stop_on_nonfinite_raises_and_tells_the_coordinator(store):
    report = _reporter(store, stop_on_nonfinite=True)
    report.step(1.0, 8)
    with pytest.raises(FloatingPointError, match="replica 3: the training loss is nan"):
        report.step(math.nan, 8)
    assert store.get_json("job/nonfinite") == {"client": "replica3", "loss": "nan"}
    report.skip_nonfinite(8)  # the caller already decided: no second stop
    report.maybe_log(3, force=True)
    (event,) = _events(store)
    assert (event["loss"], event["nonfinite"], event["samples"]) == (1.0, 2, 24)


def test_dropped_gradients_are_reported_when_counted(store):
    report = _reporter(store, count_dropped=True)
    report.step(2.0, 8)
    report.drop(1)
    report.log(0)
    report.drop(2)
    report.log(9)  # log writes even when no step was trained since the last event
    first, second = _events(store)
    assert set(first) == KEYS - {"time", "samples_per_second"} | {"dropped"}
    assert (first["step"], first["dropped"], first["loss"], first["samples"]) == (1, 1, 2.0, 8)
    assert (second["step"], second["dropped"], second["samples"]) == (10, 2, 0)
    assert math.isnan(second["loss"]) and second["versions"] == []
    assert report.dropped_total == 3


def test_a_disabled_reporter_writes_nothing_but_counts_acks(store):
    report = _reporter(store, enabled=False, stop_on_nonfinite=True)
    report.step(None, 8)  # a partition that does not see the loss
    report.acks([(0, 1), (1, 1)])
    report.maybe_log(9, force=True)
    report.log(9)
    assert _events(store) == [] and report.acked == 2


def test_for_role_takes_the_jobs_settings(store):
    cfg = JobConfig()
    cfg.train.log_every, cfg.train.on_nonfinite = 2, "stop"
    ctx = RoleContext(store, cfg, {"start_time": time.time() - 100}, "replica", 5)
    report = Reporter.for_role(ctx, 4)
    assert (report.replica, report.total, report.every) == (5, 4, 2)
    assert report.stop_on_nonfinite
    report.step(1.0, 4)
    report.maybe_log(0)
    report.step(1.0, 4)
    report.maybe_log(1)
    (event,) = store.stream("events").read()
    assert event["replica"] == 5 and event["step"] == 2 and event["time"] >= 100
