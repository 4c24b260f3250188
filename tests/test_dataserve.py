"""Data servers and their clients in one process, over a real store and gloo channels:
the stream from any start step, the prefetch bound, failing over to another server or
to a replacement, and the one clear error when nothing can serve."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from distbelief.job import JobConfig
from distbelief.data import protocol as P
from distbelief.data.client import DataClient, DataUnavailable
from distbelief.data.feed import ReplicaFeed
from distbelief.data.server import DataServer
from distbelief.runtime.context import Heartbeat, beat_key
from distbelief.runtime.store import JobStore, new_token

TIMEOUT = 10.0
SHAPE = (1, 16)
CFG = JobConfig.from_dict({"cluster": {"replicas": 2}, "data": {"batch_size": 4},
                           "train": {"seed": 2}, "augment": {"shift": 2, "noise": 0.1}})
X, Y = torch.randn(60, *SHAPE), torch.arange(60) % 10


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=TIMEOUT)
    yield store
    store.close()


@contextlib.contextmanager
def serving(store: JobStore, ident: int, generation: int = 0, y: torch.Tensor = Y,
            target_dtype: torch.dtype = torch.int64):
    """Data server `ident` in a thread (with its heartbeat) until the block ends or the
    yielded `kill()` is called (it closes its connections, as a dead one would); it
    serves X with targets `y`, sent as `target_dtype`."""
    stop = threading.Event()

    def kill() -> None:  # returns once its connections are closed
        stop.set()
        deadline = time.monotonic() + 5
        while not server._stopping.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
    server = DataServer(store, ident, generation=generation, timeout=TIMEOUT,
                        feed_for=lambda r: ReplicaFeed(X, y, CFG, r), target_dtype=target_dtype)
    skip = store.add(P.conn_counter(ident), 0)
    store.set_json(P.generation_key(ident), generation)
    thread = threading.Thread(target=server.serve, args=(stop.is_set,),
                              kwargs={"skip_tickets": skip})
    with Heartbeat(store, "dataserver", ident, period=0.2):
        thread.start()
        try:
            yield server, kill
        finally:
            stop.set()
            thread.join(15)
    assert not thread.is_alive()


def client(store, *, replica=0, servers=1, start=0, total=10, prefetch=3, timeout=TIMEOUT,
           **targets):
    return DataClient(store, replica=replica, servers=servers, start=start, total=total,
                      input_shape=SHAPE, prefetch=prefetch, timeout=timeout, **targets)


def expected(replica: int, steps, y: torch.Tensor = Y) -> list[tuple[torch.Tensor, torch.Tensor]]:
    feed = ReplicaFeed(X, y, CFG, replica)
    return [feed.batch(s) for s in steps]


def assert_batches(got, want):
    assert len(got) == len(want)
    for (xg, yg), (xw, yw) in zip(got, want):
        assert torch.equal(xg, xw) and yg.dtype == yw.dtype and torch.equal(yg, yw)


def test_a_replica_gets_its_augmented_stream_from_any_step(store):
    with serving(store, 0) as (server, _):
        for replica, start in ((0, 0), (1, 5)):
            with client(store, replica=replica, start=start, total=start + 9) as c:
                got = [c.next() for _ in range(9)]
            assert_batches(got, expected(replica, range(start, start + 9)))
        with pytest.raises(IndexError):
            c.next()
    stats = server.stats()
    assert stats["served_by_replica"] == {"0": 9, "1": 9} and not stats["clients_lost"]
    assert store.add(P.served_key(0), 0) == 18


def test_at_most_prefetch_batches_are_in_flight(store):
    with serving(store, 0) as (server, _), client(store, total=20, prefetch=3) as c:
        time.sleep(0.5)  # the server would go on if credit allowed
        assert server.stats()["served"] == 3
        c.next(), c.next()
        time.sleep(0.5)
        assert server.stats()["served"] == 5
    assert c.stats()["data_seconds"] > 0


def test_a_replica_fails_over_to_another_server_and_sees_the_same_stream(store):
    with serving(store, 0) as (_, kill0), serving(store, 1) as (second, _):
        # a client takes a server that has beaten at least once: wait for both (under load
        # server 0's first beat could come after the client chose server 1)
        deadline = time.monotonic() + 10
        while any(store.add(beat_key(f"dataserver/{d}"), 0) == 0 for d in (0, 1)):
            assert time.monotonic() < deadline, "the data servers never beat"
            time.sleep(0.01)
        with client(store, servers=2, total=12) as c:
            got = [c.next() for _ in range(4)]
            kill0()  # server 0 goes away; its prefetched batches are still good
            got += [c.next() for _ in range(8)]
        assert c.failovers == 1 and set(c.served_by) == {0, 1}
        assert second.stats()["served_by_replica"]["0"] == c.served_by[1]
    assert_batches(got, expected(0, range(12)))


def test_a_replacement_of_the_next_generation_takes_over(store):
    with serving(store, 0) as (_, kill0):
        c = client(store, total=10).__enter__()
        got = [c.next() for _ in range(3)]
        kill0()
        with serving(store, 0, generation=1):  # as the coordinator's watch loop starts it
            got += [c.next() for _ in range(7)]
            c.close()
    assert c.failovers == 1
    assert_batches(got, expected(0, range(10)))


def test_when_no_server_can_serve_the_replica_fails_in_one_line_naming_it(store):
    with serving(store, 0) as (_, kill0):
        c = client(store, total=10, prefetch=1, timeout=2.0).__enter__()
        c.next()
        kill0()
        began = time.monotonic()
        with pytest.raises(DataUnavailable) as info:
            while True:
                c.next()
    assert time.monotonic() - began < 10
    message = str(info.value)
    assert "no data server could serve step" in message and "data server 0" in message
    assert "--timeout" in message and "\n" not in message
    c.close()


def test_regression_targets_are_served_in_their_shape_and_dtype(store):
    targets = torch.randn(60, 3, 2)  # float32 (N, *S), as `load_dataset` gives --task regress
    with serving(store, 0, y=targets, target_dtype=torch.float32):
        with client(store, replica=1, start=2, total=8, target_shape=(3, 2),
                    target_dtype=torch.float32) as c:
            got = [c.next() for _ in range(6)]
    assert got[0][1].shape == (4, 3, 2)
    assert_batches(got, expected(1, range(2, 8), y=targets))
