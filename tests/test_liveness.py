"""Liveness by the coordinator's own clock.

A role's heartbeat is a counter; the coordinator notes, on its monotonic clock,
when each counter last changed (`Liveness`), so no two hosts' clocks are ever
compared. Unit tests of the record (a fake clock) and of the heartbeat thread
(a store that fails now and then), then one job in which two replicas' clocks
are an hour off either way and a third hangs (SIGSTOP): the hung one is declared
lost within 10 s and killed, the skewed ones never are, and the job finishes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest

from distbelief.metrics.log import read_metrics
from distbelief.roles import skew_clock
from distbelief.runtime.context import Heartbeat, Liveness, beat_key

from _cluster import alive, role_pid, wait_until

LIMIT = 6.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def record():
    """(liveness, counters, clock, reads): counters are what the store holds; reads
    counts the reads per name."""
    counters: dict[str, int] = {}
    reads: dict[str, int] = {}
    clock = Clock()

    def read(name: str) -> int:
        reads[name] = reads.get(name, 0) + 1
        return counters.get(name, 0)

    return Liveness(read, LIMIT, every=0.2, clock=clock), counters, clock, reads


def test_a_beating_role_is_never_lost_and_a_stopped_one_is_after_exactly_the_limit(record):
    liveness, counters, clock, _ = record
    liveness.expect("replica/0")
    for _ in range(30):  # 30 s of beats, one a second
        clock.now += 1.0
        counters["replica/0"] = counters.get("replica/0", 0) + 1
        assert not liveness.lost("replica/0")
    stopped = clock.now  # the last beat was seen at this instant
    clock.now = stopped + LIMIT
    assert not liveness.lost("replica/0")
    clock.now = stopped + LIMIT + 0.01
    assert liveness.lost("replica/0")
    assert liveness.silent_for("replica/0") == pytest.approx(LIMIT + 0.01)
    counters["replica/0"] += 1  # it beats again (it had only hung): alive again
    clock.now += 0.2  # the next read of the store
    assert not liveness.lost("replica/0")


def test_only_a_change_counts_whatever_the_value(record):
    liveness, counters, clock, _ = record
    counters["shard/0"] = 7
    liveness.expect("shard/0")
    clock.now += LIMIT + 1
    assert liveness.lost("shard/0")  # 7 all along: no beat since it was expected
    counters["shard/0"] = 3  # a counter that went down changed all the same
    clock.now += 0.2
    assert not liveness.lost("shard/0")


def test_a_role_that_never_beats_is_lost_the_limit_after_it_was_expected(record):
    liveness, counters, clock, _ = record
    liveness.expect("replica/1", "dataserver/0")
    clock.now += LIMIT
    assert not liveness.lost("replica/1")
    clock.now += 0.5
    assert liveness.lost("replica/1") and liveness.lost("dataserver/0")
    # a name nobody expected is expected from the first question on
    assert not liveness.lost("replica/2")
    clock.now += LIMIT + 0.5
    assert liveness.lost("replica/2")


def test_a_replacement_starts_a_fresh_record_past_the_old_process_beats(record):
    liveness, counters, clock, _ = record
    liveness.expect("replica/0")
    counters["replica/0"] = 40  # the first process beat 40 times, then died
    clock.now += 1
    assert not liveness.lost("replica/0")
    clock.now += LIMIT + 1
    assert liveness.lost("replica/0")
    liveness.expect("replica/0")  # the coordinator spawns a replacement
    assert not liveness.lost("replica/0")
    clock.now += LIMIT + 0.5  # the replacement never beats: the old 40 is no beat
    assert liveness.lost("replica/0")
    liveness.expect("replica/0")  # a second replacement, which does beat
    clock.now += LIMIT - 1
    counters["replica/0"] = 41  # the store's counter goes on from the old one's
    assert not liveness.lost("replica/0")
    clock.now += LIMIT - 0.5
    assert not liveness.lost("replica/0")


def test_the_store_is_read_at_most_once_per_interval(record):
    liveness, counters, clock, reads = record
    liveness.expect("replica/0")
    for _ in range(100):  # the watch loop asks far more often than it needs to
        clock.now += 1 / 32  # exact in binary: 0.2 s pass every 7th time
        liveness.lost("replica/0")
    assert reads["replica/0"] == 1 + 100 // 7  # the expectation, then one read per 0.2 s


def test_the_record_is_safe_to_ask_from_two_threads():
    counters = {"replica/0": 0}
    liveness = Liveness(lambda name: counters[name], LIMIT, every=0.0)
    liveness.expect("replica/0")
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(2000):
                assert not liveness.lost("replica/0")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(2000):
        counters["replica/0"] += 1
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)


class FlakyStore:
    """Enough of a JobStore for a Heartbeat: `add` fails while `failing` is set."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.values: dict[str, int] = {}
        self.failing = threading.Event()
        self.stopped = threading.Event()
        self.clones = 0

    def clone(self) -> FlakyStore:
        if self.failing.is_set():
            raise ConnectionResetError("store unreachable")
        self.clones += 1
        return self

    def has(self, key: str) -> bool:
        return key == "job/stop" and self.stopped.is_set()

    def add(self, key: str, amount: int) -> int:
        if self.failing.is_set():
            raise ConnectionResetError("store unreachable")
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def set_json(self, key, value) -> None:
        pass

    def count(self) -> int:
        return self.values.get(beat_key("replica/0"), 0)


def test_heartbeat_counts_and_outlives_a_transient_store_error(caplog):
    store = FlakyStore()
    with caplog.at_level(logging.INFO, logger="distbelief.runtime.context"), \
            Heartbeat(store, "replica", "0", period=0.01) as beat:
        wait_until(lambda: store.count() >= 5, 10, "five beats")
        store.failing.set()
        time.sleep(0.1)  # ten failed beats
        before = store.count()
        store.failing.clear()
        wait_until(lambda: store.count() >= before + 5, 10, "beats after the error")
        assert beat._thread.is_alive()
    assert not beat._thread.is_alive()
    assert store.clones >= 2  # a new connection after the error
    text = caplog.text
    assert text.count("did not answer") == 1 and "answers again" in text


def test_heartbeat_ends_when_the_job_stops_or_the_store_is_gone_past_its_timeout():
    store = FlakyStore()
    with Heartbeat(store, "replica", "0", period=0.01) as beat:
        wait_until(lambda: store.count() >= 2, 10, "two beats")
        store.stopped.set()  # job/stop
        beat._thread.join(5)
        assert not beat._thread.is_alive()
    gone = FlakyStore(timeout=0.3)
    with Heartbeat(gone, "replica", "0", period=0.01) as beat:
        wait_until(lambda: gone.count() >= 2, 10, "two beats")
        gone.failing.set()
        time.sleep(0.15)
        assert beat._thread.is_alive()  # within the timeout it keeps trying
        beat._thread.join(5)
        assert not beat._thread.is_alive()


def test_clock_skew_names_one_role_or_all():
    real = time.time, time.time_ns
    try:
        assert skew_clock("replica0=3600,replica1=-3600", "shard0") == 0
        assert time.time is real[0]
        assert skew_clock("replica0=3600,replica1=-3600", "replica1") == -3600
        assert abs(time.time() - (real[0]() - 3600)) < 1
        assert abs(time.time_ns() / 1e9 - (real[0]() - 3600)) < 1
        time.time, time.time_ns = real
        assert skew_clock("7", "replica0.1") == 7
        with pytest.raises(ValueError, match="DISTBELIEF_TEST_CLOCK_SKEW"):
            skew_clock("replica0=soon", "replica0")
    finally:
        time.time, time.time_ns = real


STEPS = 600
HUNG = 2
DETECT_WITHIN = 10.0  # seconds: the bound the failure model promises


@pytest.mark.timeout(240)
def test_skewed_clocks_are_no_death_and_a_hung_replica_is_lost_within_10_s(
        tmp_path, cli_job, monkeypatch):
    """Replica 0's clock is an hour ahead, replica 1's an hour behind (shard 0's too):
    neither is ever declared lost. Replica 2 is stopped (SIGSTOP) once it trained: it is
    declared lost within 10 s, killed, counted, and the others finish the job."""
    monkeypatch.setenv("DISTBELIEF_TEST_CLOCK_SKEW", "replica0=3600,replica1=-3600,shard0=3600")
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "3", "--shards", "1",
                   "--steps", str(STEPS), "--log-every", "10", "--run-dir", str(run_dir),
                   "--quiet")

    def events() -> list[dict]:
        path = run_dir / "metrics.jsonl"
        return read_metrics(path) if path.exists() else []

    def trained(r: int) -> bool:
        return any(e["event"] == "train" and e["replica"] == r for e in events())

    pid = wait_until(lambda: trained(HUNG) and role_pid(run_dir, "replica", HUNG), 120,
                     f"replica {HUNG} to train")
    try:
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(lambda: any(e["event"] == "replica_lost" and e["replica"] == HUNG
                               for e in events()),
                   DETECT_WITHIN + 10, f"replica {HUNG} to be declared lost", poll=0.05)
        took = time.monotonic() - stopped
        assert took <= DETECT_WITHIN, f"the hung replica was declared lost after {took:.1f} s"
        out, err = proc.communicate(timeout=180)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas_lost"] == 1 and summary["lost_replicas"] == [HUNG]
    assert summary["shards_lost"] == []
    assert summary["exit_codes"][f"replica{HUNG}"] == -signal.SIGKILL  # the coordinator's kill
    assert all(summary["exit_codes"][name] == 0 for name in ("replica0", "replica1", "shard0"))
    every = events()
    assert [e["replica"] for e in every if e["event"] == "replica_lost"] == [HUNG]
    assert not [e for e in every if e["event"] in ("shard_lost", "replica_restarted")]
    train = [e for e in every if e["event"] == "train"]
    # the skew took: each replica stamps its events with its own (shifted) wall clock
    assert min(e["time"] for e in train if e["replica"] == 0) > 3000
    assert max(e["time"] for e in train if e["replica"] == 1) < -3000
    last = {e["replica"]: e["step"] for e in train}
    assert last[0] == last[1] == STEPS and last[HUNG] < STEPS
    assert not alive(pid)
