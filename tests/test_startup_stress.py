"""Start-up never hangs: a rendezvous leaves its caller's store connection free, a
connection that cannot be made (or a request without answer) fails with one line naming
both ends, a shard's accept loop never waits on one client, and small jobs of every
kind (benchmarks/startup_stress.py) reach their first train event in time.

A c10d TCPStore client serves one request at a time, and gloo's rendezvous blocks in
a `get` on its store until the peer joined: on a connection shared with other threads
it used to hold a role's heartbeat and reports for as long as that took (issue 14).
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from concurrent.futures import Future

import pytest
import torch
import torch.distributed as dist

from distbelief.config import OptimizerConfig
from distbelief.errors import JobFailed
from distbelief.ps import protocol as P
from distbelief.ps.client import Handle, PSClient, ShardTimeout, ShardUnreachable
from distbelief.ps.layout import Layout
from distbelief.ps.shard import ShardServer
from distbelief.runtime.channel import Channel, Group
from distbelief.runtime.shm import remove_job_files
from distbelief.runtime.store import JobStore, new_token

from _cluster import wait_until
from test_benchmarks import run_quick

RENDEZVOUS_SECONDS = 3.0


@pytest.fixture
def master():
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    yield store
    del store


def _client(port: int) -> dist.Store:
    return dist.PrefixStore("job/", dist.TCPStore("127.0.0.1", port, None, False,
                                                  timeout=datetime.timedelta(seconds=10)))


@pytest.mark.parametrize("kind", ["channel", "group"])
def test_a_rendezvous_leaves_the_callers_store_connection_free(master, kind, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    shared = _client(master.port)  # what a role's threads share (heartbeat, reports)

    def join(store, rank):
        if kind == "channel":
            return Channel(store, "pg/free", rank, RENDEZVOUS_SECONDS)
        return Group(store, "pg/free", rank, 2, RENDEZVOUS_SECONDS)

    joined = {}
    thread = threading.Thread(target=lambda: joined.update(first=join(shared, 0)), daemon=True)
    thread.start()
    time.sleep(0.3)  # the thread is inside the rendezvous, waiting for its peer
    began = time.monotonic()
    shared.set("heartbeat", "1")  # another thread's request on the same connection
    assert shared.get("heartbeat") == b"1"
    elapsed = time.monotonic() - began
    second = join(_client(master.port), 1)  # now the peer comes
    thread.join(RENDEZVOUS_SECONDS + 5)
    assert not thread.is_alive()
    assert elapsed < 1.0, f"a request waited {elapsed:.1f} s behind a rendezvous"
    for end in (joined["first"], second):
        end.close()


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_shard_that_never_answers_fails_the_connect_with_one_line(transport, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=10)
    try:
        # registered, but it never serves: no socket, no answer to a connection request
        store.set_json("members/shard/0", {"host": socket.gethostname(), "pid": 4242})
        began = time.monotonic()
        with pytest.raises(ShardUnreachable) as caught:
            PSClient(store, Layout.balanced(10, 1), "replica1", transport=transport, timeout=1)
        message = str(caught.value)
        assert isinstance(caught.value, JobFailed)  # the coordinator's: one line, no traceback
        assert "\n" not in message
        assert message.startswith(f"replica1 could not connect to shard 0 (host "
                                  f"{socket.gethostname()}, pid 4242")
        assert f"over {transport} within 1 s (--timeout)" in message
        assert time.monotonic() - began < 10
    finally:
        store.close()


def test_a_request_without_answer_times_out_naming_both_ends():
    pending = Future()  # a shard that never answers
    with pytest.raises(ShardTimeout, match=r"^replica1's pull from shard 3 got no answer "
                                           r"within 0.1 s \(--timeout\)$"):
        Handle([pending], ["replica1's pull from shard 3"]).wait(0.1)
    assert issubclass(ShardTimeout, TimeoutError) and issubclass(ShardTimeout, JobFailed)


def test_a_ticket_whose_request_never_came_does_not_stop_the_shard(monkeypatch):
    """A gloo client takes a ticket, then writes its request: one that died in between
    must not hold the shard's accept loop (nor end the shard) while others connect."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=10)
    store.set_json("members/shard/0", {"host": socket.gethostname(), "pid": 0})
    server = ShardServer(store.clone(), shard=0, numel=10, timeout=3,
                         rule_cfg=OptimizerConfig(rule="sgd", lr=1.0))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    try:
        store.add(P.conn_counter(0), 1)  # ticket 1: its client died before the request
        began = time.monotonic()
        for transport in ("gloo", "shm"):
            with PSClient(store.clone(), Layout.balanced(10, 1), f"replica-{transport}",
                          transport=transport, timeout=10) as ps:
                ps.pull(torch.empty(10)).wait(10)
        assert time.monotonic() - began < 2.5  # served before the dead ticket's timeout
        wait_until(lambda: server.stats()["errors"], 10, "the dead ticket to be dropped")
        assert server.stats()["errors"] == ["connection request 1 never came (the client "
                                            "died?)"]
        assert thread.is_alive()  # and the shard still serves
    finally:
        stop.set()
        thread.join(10)
        remove_job_files(store.token)
        store.close()
    assert not thread.is_alive()


def test_small_jobs_reach_their_first_train_event_in_time():
    """The benchmark's first three configurations (downpour on shm and on gloo, chunks),
    back to back: none hangs or fails, each trains within 30 s of its start. (Every other
    kind of job starts in its own tests; the benchmark runs them all, many times.)"""
    report = run_quick("startup_stress", "--runs", "3", "--bound", "30", "--timeout", "30",
                       "--no-peer", timeout=240)

    assert report["runs"] == 3
    assert report["hangs"] == 0 and report["failures"] == 0 and report["slow"] == 0, \
        report["problems"]
    assert set(report["configurations"]) == {"downpour", "downpour_gloo", "chunks"}
    assert all(c["runs"] == c["ok"] == 1 for c in report["configurations"].values())
    assert 0 < report["startup_seconds"]["p50"] <= report["startup_seconds"]["slowest"] < 30
    assert report["met"] is True
