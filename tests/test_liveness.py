"""Liveness by the coordinator's own clock.

A role's heartbeat is a counter; the coordinator notes, on its monotonic clock,
when each counter last changed (`Liveness`), so no two hosts' clocks are ever
compared. Unit tests of the record (a fake clock) and of the heartbeat thread
(a store that fails now and then), then one job in which two replicas' clocks
are an hour off either way and a third hangs (SIGSTOP): the hung one is declared
lost within 10 s and killed, the skewed ones never are, and the job finishes.

Liveness means progress: a role beats only while its main loop advances
(`Watchdog`, fed by the loop; a wait for other roles is no stall). Unit tests of
the watchdog and of a heartbeat that stops when it starves, then jobs in which
a replica's (or a shard's) main thread blocks for ever at a fault point while
its process and heartbeat thread live on: it is lost within --progress-timeout
plus a few seconds, and handled like a dead one (replaced, counted, or the end
of the job in one line saying it made no progress).
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
from distbelief.runtime.context import Heartbeat, Liveness, Watchdog, beat_key, stuck_key
from distbelief.runtime.faults import ENV as FAULTS
from distbelief.watch import LOST_AFTER

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

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.values.pop(key, None)

    def add(self, key: str, amount: int) -> int:
        if self.failing.is_set():
            raise ConnectionResetError("store unreachable")
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def set_json(self, key, value) -> None:
        self.values[key] = value

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


def test_watchdog_counts_a_stall_from_the_last_feed_and_not_while_waiting_for_others():
    clock = Clock()
    dog = Watchdog(clock)
    clock.now += 100
    assert dog.stalled_for() == 0.0  # starting up: not judged before the first feed
    dog.feed()
    clock.now += 3.5
    assert dog.stalled_for() == pytest.approx(3.5)
    with dog.waiting():  # a barrier for a slower replica, however long
        clock.now += 1000
        assert dog.stalled_for() == 0.0
        with dog.waiting():  # nested waits
            clock.now += 10
        assert dog.stalled_for() == 0.0
    assert dog.stalled_for() == 0.0  # the loop's own time counts from the wait's end
    clock.now += 2
    assert dog.stalled_for() == pytest.approx(2)
    dog.feed()
    assert dog.stalled_for() == 0.0


def test_heartbeat_stops_while_the_loop_makes_no_progress_and_says_so_once(caplog):
    store, dog = FlakyStore(), Watchdog()
    with caplog.at_level(logging.INFO, logger="distbelief.runtime.context"), \
            Heartbeat(store, "replica", "0", period=0.01, watchdog=dog, bound=0.3):
        wait_until(lambda: store.count() >= 3, 10, "beats before the first feed")
        for _ in range(30):  # a loop that advances beats, however long it runs
            dog.feed()
            time.sleep(0.02)
        assert stuck_key("replica/0") not in store.values
        wait_until(lambda: stuck_key("replica/0") in store.values, 10, "the stall noticed")
        stalled = store.count()
        time.sleep(0.2)
        assert store.count() == stalled  # no beat while stuck: the coordinator loses it
        assert store.values[stuck_key("replica/0")] == {"seconds": 0.3}
        dog.feed()  # it was only slow: it beats again, the record goes
        wait_until(lambda: store.count() > stalled, 10, "beats after progress")
        assert stuck_key("replica/0") not in store.values
    text = caplog.text
    assert text.count("made no progress") == 1 and "makes progress again" in text
    # the log names where the role's thread (this one) stood
    assert "test_heartbeat_stops_while_the_loop_makes_no_progress" in text


def test_progress_timeout_is_validated_up_front(tmp_path):
    import subprocess

    from _cluster import CLI

    for bad in ("0", "0.5", "-3", "inf", "nan"):
        done = subprocess.run([*CLI, "train", "--progress-timeout", bad, "--steps", "1"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "--progress-timeout" in done.stderr
    assert not (tmp_path / "runs").exists()


BOUND = 2  # --progress-timeout of the jobs below
HANG_AT = 21  # replica 1's main thread blocks at its 21st step: 20 steps are done
LOST_WITHIN = BOUND + LOST_AFTER + 4  # its last feed + the bound, the beats' silence, slack


def _hang_job(tmp_path, cli_job, monkeypatch, *extra: str, steps: int = 30,
              fault: str = f"replica.step/replica1/{HANG_AT}=hang"):
    """A job whose replica 1 (or the role `fault` names) hangs; returns (proc, run_dir, events)."""
    monkeypatch.setenv(FAULTS, fault)
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "2", "--shards", "1",
                   "--steps", str(steps), "--log-every", "10", "--run-dir", str(run_dir),
                   "--progress-timeout", str(BOUND), "--quiet", *extra)

    def events() -> list[dict]:
        path = run_dir / "metrics.jsonl"
        return read_metrics(path) if path.exists() else []

    return proc, run_dir, events


def _time_to_loss(events, event: str) -> float:
    """Seconds from replica 1's last step before its hang (its step-20 report, which
    it makes just before) to the coordinator's `event` for it, as this test saw them."""
    wait_until(lambda: any(e["event"] == "train" and e["replica"] == 1 and e["step"] == 20
                           for e in events()), 120, "replica 1 to train 20 steps", poll=0.05)
    hung = time.monotonic()
    wait_until(lambda: any(e["event"] == event and e["replica"] == 1 for e in events()),
               LOST_WITHIN + 20, f"replica 1 to be declared lost ({event})", poll=0.05)
    took = time.monotonic() - hung
    print(f"replica 1 hung; {event} after {took:.1f} s")  # shown with pytest -s
    return took


@pytest.mark.timeout(240)
def test_a_replica_whose_main_thread_hangs_is_replaced_and_the_job_finishes(
        tmp_path, cli_job, monkeypatch):
    """Replica 1 blocks for ever before its 21st step; its heartbeat thread would beat on.
    It is lost within the bound plus a few seconds, replaced (--restart-replicas: the
    replacement does the last 10 steps and never reaches a 21st), and the job finishes."""
    proc, run_dir, events = _hang_job(tmp_path, cli_job, monkeypatch, "--restart-replicas")
    took = _time_to_loss(events, "replica_restarted")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert BOUND <= took <= LOST_WITHIN, f"declared lost after {took:.1f} s"
    every = events()
    restarted = [e for e in every if e["event"] == "replica_restarted"]
    assert [(e["replica"], e["step"], e.get("no_progress_seconds")) for e in restarted] == \
        [(1, 20, BOUND)]
    assert not [e for e in every if e["event"] in ("replica_lost", "shard_lost")]
    last = {e["replica"]: e["step"] for e in every if e["event"] == "train"}
    assert last == {0: 30, 1: 30}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas_lost"] == 0 and summary["shards_lost"] == []
    assert "made no progress" in (run_dir / "logs" / "replica1.log").read_text()


@pytest.mark.timeout(240)
def test_a_replica_whose_main_thread_hangs_is_counted_lost_like_a_dead_one(
        tmp_path, cli_job, monkeypatch):
    """Without --restart-replicas Downpour counts the hung replica out, kills it, and the
    other finishes; the shard, idle between requests, is never declared lost."""
    proc, run_dir, events = _hang_job(tmp_path, cli_job, monkeypatch, steps=300)
    took = _time_to_loss(events, "replica_lost")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert BOUND <= took <= LOST_WITHIN, f"declared lost after {took:.1f} s"
    assert "(--progress-timeout 2)" in (run_dir / "logs" / "replica1.log").read_text()
    every = events()
    assert [(e["replica"], e.get("no_progress_seconds")) for e in every
            if e["event"] == "replica_lost"] == [(1, BOUND)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas_lost"] == 1 and summary["lost_replicas"] == [1]
    assert summary["shards_lost"] == []
    assert summary["exit_codes"]["replica1"] == -signal.SIGKILL  # the coordinator's kill
    assert summary["exit_codes"]["replica0"] == summary["exit_codes"]["shard0"] == 0


@pytest.mark.timeout(240)
def test_a_hung_sync_replica_ends_the_job_in_one_line_and_its_waiting_peer_is_not_blamed(
        tmp_path, cli_job, monkeypatch):
    """Synchronous training cannot go on without a replica: the job fails, naming replica 1
    and that it made no progress; replica 0, waiting in the all-reduce for it, is not lost."""
    proc, run_dir, events = _hang_job(tmp_path, cli_job, monkeypatch, "--algorithm", "sync",
                                      steps=300)
    began = time.monotonic()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("distbelief: job failed: replica 1 was lost at step 20 ("), line
    assert "made no progress for 2 s" in line and "cannot go on without it" in line
    assert time.monotonic() - began < 120


@pytest.mark.timeout(240)
def test_a_shard_whose_accept_loop_hangs_is_lost_and_ends_the_job(tmp_path, cli_job,
                                                                   monkeypatch):
    """The shard's main thread (its accept loop) blocks; its client threads and heartbeat
    thread run on. Without a checkpoint to restart it from, the job fails in one line."""
    proc, run_dir, events = _hang_job(tmp_path, cli_job, monkeypatch, steps=100000,
                                      fault="shard.pass/shard0/100=hang")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("distbelief: job failed: parameter shard 0 was lost ("), line
    assert "made no progress for 2 s" in line
    assert "made no progress" in (run_dir / "logs" / "shard0.log").read_text()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("hang_at,steps", [(5, 1500), (1, 300)],
                         ids=["while-serving", "before-any-connection"])
def test_a_data_server_whose_accept_loop_hangs_is_replaced_and_its_replicas_wait_unblamed(
        tmp_path, cli_job, monkeypatch, hang_at, steps):
    """The first data server's accept loop blocks (its streams run on until it is killed);
    it is replaced, the replicas, waiting for batches meanwhile, are not lost, and the job
    finishes. Each replica step sleeps 10 ms, so the job outlasts the detection. Hung
    before its first pass, it never joins a replica's connection: the replica gives that
    up when the replacement comes (it waited the whole --timeout before, and was lost)."""
    proc, run_dir, events = _hang_job(
        tmp_path, cli_job, monkeypatch, "--data-servers", "1", steps=steps,
        fault=f"dataserver.pass/dataserver0.g0/{hang_at}=hang,replica.step/*/*=sleep:0.01")
    out, err = proc.communicate(timeout=100)  # --timeout is 120: a replica must not wait it
    assert proc.returncode == 0, err[-3000:]
    every = events()
    lost = [e for e in every if e["event"] == "dataserver_lost"]
    assert [(e["server"], e["generation"], e.get("no_progress_seconds")) for e in lost] == \
        [(0, 1, BOUND)]
    assert not [e for e in every if e["event"] in ("replica_lost", "replica_restarted")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas_lost"] == 0
    assert "made no progress" in (run_dir / "logs" / "dataserver0.log").read_text()
