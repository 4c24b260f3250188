"""Store streams (`runtime.store`): appends and their one reader, with writers that die
between reserving an index and writing it (the hole that once stopped a job's stream)."""

from __future__ import annotations

import threading
import time

import pytest

from distbelief.runtime import store as S


def test_values_come_once_in_order_and_are_deleted(store):
    reader = store.stream("s")
    for i in range(3):
        assert store.append("s", {"i": i}) == i
    assert reader.read() == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert reader.read() == []
    assert not any(store.has(f"s/{i}") for i in range(3))


def test_a_dead_writers_hole_is_given_up_after_the_grace(store, monkeypatch):
    monkeypatch.setattr(S, "HOLE_SECONDS", 0.2)
    reader = store.stream("s")
    store.append("s", "a")
    store.add("s/count", 1)  # index 1 reserved by a writer that died before writing it
    store.append("s", "c")
    assert reader.read() == ["a"]  # the hole may still be a slow writer
    assert reader.read() == []
    time.sleep(0.25)
    assert reader.read() == ["c"] and reader.holes == 1


def test_a_reserved_last_index_is_waited_for(store, monkeypatch):
    """Nothing reserved after it: its writer may be slow, never given up."""
    monkeypatch.setattr(S, "HOLE_SECONDS", 0.0)
    reader = store.stream("s")
    store.add("s/count", 1)
    for _ in range(3):
        assert reader.read() == []
    assert reader.holes == 0


def test_a_slow_writer_whose_index_was_given_up_appends_again(store, monkeypatch):
    monkeypatch.setattr(S, "HOLE_SECONDS", 0.0)
    reader = store.stream("s")
    store.add("s/count", 1)  # the slow writer's reservation...
    store.append("s", "later")
    reader.read()  # sees the hole
    assert reader.read() == ["later"] and reader.holes == 1
    # ...its write now finds the index taken: `append` reserves the next one
    assert store.raw.compare_set("s/0", "", '"slow"') == S.HOLE.encode()
    assert store.append("s", "slow") == 2
    assert reader.read() == ["slow"]


def test_wait_skips_a_hole_another_thread_seals(store, monkeypatch):
    """Sandblaster's driver blocks in `wait`; its watchdog seals a dead worker's hole."""
    monkeypatch.setattr(S, "HOLE_SECONDS", 0.1)
    reader = store.stream("s")
    store.add("s/count", 1)  # dead writer
    store.append("s", "next")
    sealer = store.clone()
    stop = threading.Event()

    def watchdog():
        while not stop.wait(0.05):
            reader.seal_hole(sealer)

    thread = threading.Thread(target=watchdog)
    thread.start()
    try:
        assert reader.wait(5) == "next"
    finally:
        stop.set()
        thread.join(5)
    assert reader.holes == 1


def test_wait_times_out(store):
    with pytest.raises(TimeoutError):
        store.stream("s").wait(0.1)
